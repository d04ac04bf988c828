"""Tied layers across stages: one module copied on every stage that holds its key, kept equal.

At the start the copies take the first holder's weights; after each backward their
gradients are summed (each holder sends its gradient to the first, which adds them
up and sends the sum back), so every copy takes the same step. Messages go through
the pipeline's :class:`~zero_pipe._transport.Transport` on the pipeline group; a tie
is named by its key's position among *all* tie keys of the model, which every stage
knows, so stages that hold different sets of ties still agree.
"""

from __future__ import annotations

import torch
from torch import nn

from ._module import PipelineModule
from ._transport import Transport

__all__ = ["reduce_tied_grads", "sync_tied_weights"]


def reduce_tied_grads(module: PipelineModule, transport: Transport) -> None:
    """Sum each tie's gradients over the stages holding it (a missing gradient counts as zero)."""
    for index, key, params in _ties(module):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        flat = _exchange(transport, index, module.tie_holders[key], flat, "tied", add=True)
        for p, piece in zip(params, _split(flat, params)):
            p.grad = piece.clone()


def sync_tied_weights(module: PipelineModule, transport: Transport) -> None:
    """Make every copy of a tied module start from the first holder's weights."""
    with torch.no_grad():
        for index, key, params in _ties(module):
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            flat = _exchange(transport, index, module.tie_holders[key], flat, "tied_init", add=False)
            for p, piece in zip(params, _split(flat, params)):
                p.copy_(piece)
    transport.flush()


def _ties(module: PipelineModule) -> list[tuple[int, str, list[nn.Parameter]]]:
    every = sorted(module.tie_holders)
    return [(every.index(key), key, params) for key, params in module.tied_parameters().items()]


def _split(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [piece.view_as(p) for piece, p in zip(flat.split([p.numel() for p in params]), params)]


def _exchange(transport: Transport, index: int, holders: list[int], flat: torch.Tensor, kind: str, *,
              add: bool) -> torch.Tensor:
    """Through the first holder: with ``add``, the sum of every holder's ``flat``; else the first's."""
    rank, root = transport.comm.rank, holders[0]
    what = f"tie {index}'s {'gradients' if add else 'weights'}"
    if rank == root:
        if add:
            for other in holders[1:]:
                flat = flat + transport.recv((kind, index, other), other, expect=(flat.shape, flat.dtype), what=what)
        for other in holders[1:]:
            transport.send((kind, index, root), flat, other)
        return flat
    if add:
        transport.send((kind, index, rank), flat, root)
    return transport.recv((kind, index, root), root, expect=(flat.shape, flat.dtype), what=what)
