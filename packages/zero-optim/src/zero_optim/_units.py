"""How stage 3 cuts a model into gather units: which modules head one, and the parameters each gathers.

One place decides it, so that the sharder that builds the units and the memory plan that predicts
them (``zero plan``) cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["UnitRoots", "unit_parameters", "unit_roots"]


def _runs_forward(module: nn.Module) -> bool:
    """Whether calling ``module`` runs code of its own (containers such as ModuleList are never called)."""
    return type(module).forward is not nn.Module.forward


@dataclass
class UnitRoots:
    """The modules heading gather units, in module order; ``grouped`` (ids) head a whole subtree, and
    ``inside`` (ids) are the modules within one, which get no hooks of their own."""

    roots: list[nn.Module]
    grouped: set[int]
    inside: set[int]


def unit_roots(model: nn.Module, unit_numel: int) -> UnitRoots:
    """Every module holding parameters heads a unit of its own parameters, except that, with
    ``unit_numel`` above 0, the largest subtrees of at most that many elements whose head runs a
    forward of its own (a transformer block, not the ModuleList that holds the blocks, whose hooks
    would never fire) are gathered whole: fewer, larger all-gathers. The model itself never is."""
    found = UnitRoots([], set(), set())

    def visit(module: nn.Module) -> None:
        found.roots.append(module)
        if (unit_numel and module is not model and _runs_forward(module)
                and sum(p.numel() for p in module.parameters()) <= unit_numel):
            found.grouped.add(id(module))
            found.inside.update(id(m) for m in module.modules() if m is not module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def unit_parameters(model: nn.Module, unit_numel: int) -> list[list[tuple[str, nn.Parameter]]]:
    """The (name, parameter) pairs each unit head gathers, in module order, a parameter shared by
    several modules (a tied weight) with the first; heads that gather nothing are left out. Stage 3
    then keeps the parameters of at most ``persistence_threshold`` elements whole, in one more unit."""
    found = unit_roots(model, unit_numel)
    names = {id(p): n for n, p in model.named_parameters()}
    placed: set[int] = set()
    units = []
    for module in found.roots:
        mine = []
        for p in module.parameters(recurse=id(module) in found.grouped):
            if id(p) not in placed:
                placed.add(id(p))
                mine.append((names[id(p)], p))
        if mine:
            units.append(mine)
    return units
