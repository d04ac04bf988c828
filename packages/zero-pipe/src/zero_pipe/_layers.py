"""Layer specifications: a layer described, to be built only on the stage that runs it.

A 100-layer model cut over 8 stages should not allocate 100 layers on every rank
only to throw 88 away; a :class:`LayerSpec` holds the class and its arguments and
builds the module where it is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["LayerSpec", "TiedLayerSpec"]


class LayerSpec:
    """``typename(*args, **kwargs)``, built later by :meth:`build`."""

    def __init__(self, typename: type[nn.Module], *args: Any, **kwargs: Any):
        if not (isinstance(typename, type) and issubclass(typename, nn.Module)):
            raise TypeError(f"LayerSpec needs an nn.Module class, got {typename!r}")
        self.typename = typename
        self.args = args
        self.kwargs = kwargs

    def build(self) -> nn.Module:
        return self.typename(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.typename.__name__})"


class TiedLayerSpec(LayerSpec):
    """A layer whose parameters are shared by every layer of the same ``key``.

    The classic case is a language model's input embedding and output head on the
    first and last stage: each stage holding the key builds the module once, every
    layer of that key on that stage uses that one module, and after backward the
    gradients of the module's parameters are summed across the stages holding it,
    so all copies take the same step and stay equal.

    Args:
        key: the name of the tie.
        typename, args, kwargs: the module to build (the first spec of a key seen
            on a stage builds it).
        forward_fn: how this layer uses the shared module, ``forward_fn(module, x)``;
            default ``module(x)``. An output head tied to an embedding passes
            ``lambda emb, x: x @ emb.weight.t()``.
    """

    def __init__(self, key: str, typename: type[nn.Module], *args: Any,
                 forward_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None, **kwargs: Any):
        super().__init__(typename, *args, **kwargs)
        if not key or "." in key:
            raise ValueError(f"a tie key must be a non-empty name without dots, got {key!r}")
        self.key = key
        self.forward_fn = forward_fn

    def __repr__(self) -> str:
        return f"TiedLayerSpec({self.key!r}, {self.typename.__name__})"
