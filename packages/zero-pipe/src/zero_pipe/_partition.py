"""Cutting a list of layers into consecutive parts, one per (virtual) stage.

A part's cost is the sum of its layers' weights; the cut minimises the most
expensive part (the pipeline runs at the pace of its slowest stage), and among
equally good cuts prefers the one with the fewest layers in its largest part.
Every part gets at least one layer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["layer_weights", "partition_balanced"]


def partition_balanced(weights: Sequence[float], parts: int) -> list[int]:
    """Boundaries ``b`` (``len(b) == parts + 1``): part ``i`` holds layers ``b[i]:b[i + 1]``."""
    n = len(weights)
    if parts < 1:
        raise ValueError(f"cannot cut layers into {parts} parts")
    if n < parts:
        raise ValueError(f"cannot cut {n} layers into {parts} pipeline stages: every stage needs at least "
                         f"one layer (use fewer stages or more layers)")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = (float("inf"), n + 1)
    # best[k][i]: the best (max cost, max layers) cutting the first i layers into k parts
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = (0.0, 0)
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                prev = best[k - 1][j]
                if prev == inf:
                    continue
                cand = (max(prev[0], prefix[i] - prefix[j]), max(prev[1], i - j))
                if cand < best[k][i]:
                    best[k][i], cut[k][i] = cand, j
    bounds = [n]
    for k in range(parts, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


def layer_weights(layers: Sequence[object], method: str) -> list[float]:
    """The weight of each layer under a ``partition_method``.

    - ``"uniform"``: every layer weighs 1 (balances the number of layers).
    - ``"parameters"``: the number of parameters (layer specs are built on the meta
      device to count them, so nothing is allocated).
    - ``"type:<regex>"``: 1 for layers whose class name matches the regex
      (case-insensitive), 0 for the rest: balances e.g. transformer blocks.
    """
    from ._layers import LayerSpec

    def module_of(layer: object) -> nn.Module | None:
        if isinstance(layer, LayerSpec):
            with torch.device("meta"):
                return layer.build()
        return layer if isinstance(layer, nn.Module) else None

    def type_name(layer: object) -> str:
        if isinstance(layer, LayerSpec):
            return layer.typename.__name__
        return type(layer).__name__ if isinstance(layer, nn.Module) else getattr(layer, "__name__", "")

    if method == "uniform":
        return [1.0] * len(layers)
    if method == "parameters":
        out = []
        for layer in layers:
            module = module_of(layer)
            out.append(float(sum(p.numel() for p in module.parameters())) if module is not None else 0.0)
        return out
    if method.startswith("type:"):
        pattern = re.compile(method[5:], re.IGNORECASE)
        return [1.0 if pattern.search(type_name(layer)) else 0.0 for layer in layers]
    raise ValueError(f"unknown partition_method {method!r}; expected 'parameters', 'uniform' or 'type:<regex>'")
