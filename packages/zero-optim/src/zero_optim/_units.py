"""How stage 3 cuts a model into gather units: which modules head one, and the parameters each gathers.

One place decides it, so that the sharder that builds the units and the memory plan that predicts
them (``zero plan``) cannot disagree.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

__all__ = ["UnitRoots", "granularity", "unit_parameters", "unit_roots"]

_LARGEST_WHOLE = 1_000_000_000  # DeepSpeed never fuses a subtree above this many elements by granularity


def _runs_forward(module: nn.Module) -> bool:
    """Whether calling ``module`` runs code of its own (containers such as ModuleList are never called)."""
    return type(module).forward is not nn.Module.forward


def _is_container(module: nn.Module) -> bool:
    """torch's own container classes, by name as DeepSpeed's measure tells them (a subclass of
    nn.Sequential with a forward of its own is a layer there)."""
    return type(module).__name__ in nn.modules.container.__all__


def granularity(model: nn.Module) -> dict[int, int]:
    """DeepSpeed's module granularity (``stage3_module_granularity_threshold``), by module id: the
    elements of a module's subtree divided by the layers in it -- its descendants without children
    that hold parameters, plus every module with children that is not a container and holds
    parameters in its subtree, itself included.
    Modules without children, containers and subtrees above 10^9 elements get ``sys.maxsize``: they
    are never fused by it."""
    found: dict[int, int] = {}

    def visit(module: nn.Module) -> tuple[int, int]:  # (layers, elements) of the subtree
        elements = sum(p.numel() for p in module.parameters(recurse=False))
        children = list(module.children())
        layers = 0
        for child in children:
            child_layers, child_elements = visit(child)
            layers, elements = layers + child_layers, elements + child_elements
        if not children or not elements:  # a leaf is a layer if it holds parameters; a subtree without any is not
            found[id(module)] = sys.maxsize
            return (1 if elements else 0), elements
        if _is_container(module):
            found[id(module)] = sys.maxsize
            return layers, elements
        layers += 1
        found[id(module)] = elements // layers if elements <= _LARGEST_WHOLE else sys.maxsize
        return layers, elements

    visit(model)
    return found


@dataclass
class UnitRoots:
    """The modules heading gather units, in module order; ``grouped`` (ids) head a whole subtree, and
    ``inside`` (ids) are the modules within one, which get no hooks of their own."""

    roots: list[nn.Module]
    grouped: set[int]
    inside: set[int]

    def parameters(self, model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
        """The (name, parameter) pairs each head gathers, in module order, a parameter shared by several
        modules (a tied weight) with the first; heads that gather nothing are left out."""
        names = {id(p): n for n, p in model.named_parameters()}
        placed: set[int] = set()
        units = []
        for module in self.roots:
            mine = []
            for p in module.parameters(recurse=id(module) in self.grouped):
                if id(p) not in placed:
                    placed.add(id(p))
                    mine.append((names[id(p)], p))
            if mine:
                units.append(mine)
        return units


def unit_roots(model: nn.Module, unit_numel: int, granularity_threshold: int = 0) -> UnitRoots:
    """Every module holding parameters heads a unit of its own parameters, except that whole subtrees
    are gathered as one unit (fewer, larger all-gathers), top-down, where:

    - ``unit_numel`` > 0: the subtree holds at most that many elements and its head runs a forward
      of its own (a transformer block, not the ModuleList that holds the blocks, whose hooks would
      never fire); the model itself never is one;
    - ``granularity_threshold`` > 0: the head's :func:`granularity` is at most that (DeepSpeed's
      ``stage3_module_granularity_threshold``, which may fuse the model itself)."""
    found = UnitRoots([], set(), set())
    fine = granularity(model) if granularity_threshold else {}

    def whole(module: nn.Module) -> bool:  # (a module that is never called is not: its hooks would never fire)
        numel = sum(p.numel() for p in module.parameters())
        if not numel or not _runs_forward(module):
            return False
        return (fine.get(id(module), sys.maxsize) <= granularity_threshold
                or bool(unit_numel and module is not model and numel <= unit_numel))

    def visit(module: nn.Module) -> None:
        found.roots.append(module)
        if whole(module):
            found.grouped.add(id(module))
            found.inside.update(id(m) for m in module.modules() if m is not module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def unit_parameters(model: nn.Module, unit_numel: int,
                    granularity_threshold: int = 0) -> list[list[tuple[str, nn.Parameter]]]:
    """The (name, parameter) pairs each unit head gathers (:func:`unit_roots`, :meth:`UnitRoots.parameters`).
    Stage 3 then keeps the parameters of at most ``persistence_threshold`` elements whole, in one more
    unit."""
    return unit_roots(model, unit_numel, granularity_threshold).parameters(model)
