"""PipelineModule: a model written as a list of layers, of which this rank builds its stage.

The layer list is cut into ``num_stages * chunks`` consecutive parts (see
``_partition``); rank ``stage_id`` builds parts ``stage_id``, ``stage_id +
num_stages``, ... (one per model chunk) and nothing else. Parameters are named by
the layer's index in the whole list (``"layers.3.weight"``), so a stage's
``state_dict`` is a slice of the whole model's whatever the cut; a tied module's
parameters are named ``"tied.<key>.<name>"`` on every stage holding it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._layers import LayerSpec, TiedLayerSpec
from ._partition import layer_weights, partition_balanced

__all__ = ["PipelineModule", "Segment"]

Layer = LayerSpec | nn.Module | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Segment:
    """One layer's piece of the autograd graph: its (cut) input, its output, its parameters."""

    input: Any
    output: Any
    params: list[nn.Parameter]


class PipelineModule(nn.Module):
    """This rank's share of a pipelined model.

    Args:
        layers: the whole model in order: :class:`LayerSpec` (built only here if it
            falls on this stage), :class:`TiedLayerSpec`, ready ``nn.Module``s, or
            parameter-free callables (``lambda x: x.flatten(1)``).
        num_stages: pipeline ranks.
        stage_id: which stage this rank is (its rank in the pipeline group).
        loss_fn: ``loss_fn(output, labels)`` on the last stage, for training and
            :meth:`PipelineEngine.eval_batch`.
        partition_method: ``"parameters"`` (balance parameter counts), ``"uniform"``
            (balance layer counts) or ``"type:<regex>"`` (balance the layers whose
            class name matches).
        activation_checkpoint_interval: recompute activations in backward for runs
            of this many layers (``torch.utils.checkpoint``, non-reentrant); 0 keeps
            them. Saves activation memory for one extra forward.
        chunks: model chunks per rank, for the interleaved schedule.
        seed: if given, layer ``i`` is built after ``torch.manual_seed(seed + i)``
            (a tie after the seed of its first layer), so the weights do not depend
            on the cut or on the number of stages.
    """

    def __init__(self, layers: Sequence[Layer], num_stages: int, *, stage_id: int,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, partition_method: str = "parameters",
                 activation_checkpoint_interval: int = 0, chunks: int = 1, seed: int | None = None):
        super().__init__()
        layers = list(layers)
        if num_stages < 1 or chunks < 1:
            raise ValueError(f"num_stages and chunks must be >= 1, got {num_stages} and {chunks}")
        if not 0 <= stage_id < num_stages:
            raise ValueError(f"stage_id {stage_id} is outside a pipeline of {num_stages} stages")
        if activation_checkpoint_interval < 0:
            raise ValueError(f"activation_checkpoint_interval must be >= 0, got {activation_checkpoint_interval}")
        for i, layer in enumerate(layers):
            if not (isinstance(layer, (LayerSpec, nn.Module)) or callable(layer)):
                raise TypeError(f"layer {i} is a {type(layer).__name__}: expected a LayerSpec, an nn.Module "
                                "or a callable")
        parts = num_stages * chunks
        if len(layers) < parts:
            raise ValueError(f"cannot cut {len(layers)} layers into {num_stages} stages x {chunks} chunks = "
                             f"{parts} parts: every part needs at least one layer")
        weights = layer_weights(layers, partition_method)
        if partition_method.startswith("type:") and sum(w > 0 for w in weights) < parts:
            raise ValueError(f"partition_method {partition_method!r} matches {int(sum(weights))} layers, fewer "
                             f"than the {parts} parts to fill")
        self.num_stages, self.stage_id, self.chunks = num_stages, stage_id, chunks
        self.loss_fn = loss_fn
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.boundaries = partition_balanced(weights, parts)
        self.tie_holders: dict[str, list[int]] = {}
        first_of_key: dict[str, int] = {}
        for i, layer in enumerate(layers):
            if isinstance(layer, TiedLayerSpec):
                first_of_key.setdefault(layer.key, i)
                holders = self.tie_holders.setdefault(layer.key, [])
                if self.stage_of_layer(i) not in holders:
                    holders.append(self.stage_of_layer(i))
        self.layers = nn.ModuleDict()
        self.tied = nn.ModuleDict()
        self._calls: dict[int, Callable[[torch.Tensor], Any]] = {}
        for i in self.layer_indices():
            layer = layers[i]
            if isinstance(layer, TiedLayerSpec):
                if layer.key not in self.tied:
                    if seed is not None:
                        torch.manual_seed(seed + first_of_key[layer.key])
                    self.tied[layer.key] = layer.build()
                module = self.tied[layer.key]
                self._calls[i] = partial(layer.forward_fn, module) if layer.forward_fn else module
            elif isinstance(layer, LayerSpec):
                if seed is not None:
                    torch.manual_seed(seed + i)
                self.layers[str(i)] = self._calls[i] = layer.build()
            elif isinstance(layer, nn.Module):
                self.layers[str(i)] = self._calls[i] = layer
            else:
                self._calls[i] = layer

    # -- where things are ----------------------------------------------------------------
    def chunk_range(self, chunk: int, stage: int | None = None) -> range:
        """The global indices of the layers of ``chunk`` on ``stage`` (default: this one)."""
        vs = chunk * self.num_stages + (self.stage_id if stage is None else stage)
        return range(self.boundaries[vs], self.boundaries[vs + 1])

    def layer_indices(self, stage: int | None = None) -> list[int]:
        return [i for c in range(self.chunks) for i in self.chunk_range(c, stage)]

    def stage_of_layer(self, index: int) -> int:
        for vs in range(len(self.boundaries) - 1):
            if self.boundaries[vs] <= index < self.boundaries[vs + 1]:
                return vs % self.num_stages
        raise IndexError(f"layer {index} is outside the model's {self.boundaries[-1]} layers")

    def describe_stage(self, stage: int | None = None) -> str:
        stage = self.stage_id if stage is None else stage
        ranges = ", ".join(f"{r.start}-{r.stop - 1}" for r in (self.chunk_range(c, stage) for c in range(self.chunks)))
        return f"stage {stage} (layers {ranges})"

    # -- running ---------------------------------------------------------------------------
    def forward_chunk(self, chunk: int, x: Any, segments: list[Segment] | None = None) -> Any:
        """Run this rank's ``chunk`` on ``x``, checkpointing runs of layers if asked to.

        With ``segments`` (for zero-bubble schedules, which compute the input's and the
        weights' gradients at different times), each layer's input is cut from the graph
        and ``(layer input, layer output, layer parameters)`` is appended per layer, so
        either half of the backward can run layer by layer without redoing the other.
        """
        indices = list(self.chunk_range(chunk))
        if segments is not None:
            for i in indices:
                cut = (x.detach().requires_grad_() if segments and isinstance(x, torch.Tensor) and x.is_floating_point()
                       else x)
                x = self._calls[i](cut)
                segments.append(Segment(cut, x, self._params_of(i)))
            return x
        k = self.activation_checkpoint_interval
        if k == 0 or not torch.is_grad_enabled():
            return self._run(indices, x)
        for start in range(0, len(indices), k):
            x = checkpoint(self._run, indices[start:start + k], x, use_reentrant=False)
        return x

    def forward(self, x: Any) -> Any:
        """The whole stage on ``x``; a rank holding several chunks runs them one by one with
        :meth:`forward_chunk` instead, because the other stages run in between."""
        if self.chunks != 1:
            raise RuntimeError(f"this stage holds {self.chunks} model chunks; call forward_chunk(chunk, x)")
        return self.forward_chunk(0, x)

    def _params_of(self, index: int) -> list[nn.Parameter]:
        call = self._calls[index]
        module = call if isinstance(call, nn.Module) else getattr(call, "args", (None,))[0]
        return [p for p in module.parameters() if p.requires_grad] if isinstance(module, nn.Module) else []

    def _run(self, indices: list[int], x: Any) -> Any:
        for i in indices:
            x = self._calls[i](x)
        return x

    def tied_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Per tie key held here by more than one stage, the shared module's parameters."""
        return {key: list(self.tied[key].parameters()) for key in sorted(self.tied)
                if len(self.tie_holders[key]) > 1}
