"""Activation checkpointing: keep a few activations, recompute the rest in backward.

Built on ``torch.utils.checkpoint`` (non-reentrant: any mix of tensors and other
values in and out, ``torch.autograd.grad`` works, keyword arguments pass through)
and on saved-tensor hooks. A checkpointed call keeps only its inputs; torch saves
them through whatever saved-tensor hooks are active around the call, and that is
where DeepSpeed's options act:

- ``cpu_checkpointing``: the kept inputs are copied to host memory (pinned when
  CUDA is present) and brought back for the recomputation;
- ``partition_activations``: each rank of the tensor-parallel group keeps 1/N of
  each kept input and the recomputation all-gathers it (the inputs of a
  tensor-parallel region are replicated across that group);
- ``number_checkpoints``: segments of :meth:`ActivationCheckpointing.sequential`;
- ``selective``: ops whose outputs are kept rather than recomputed (matmuls by
  default), through torch's selective-checkpoint contexts.

The RNG state of every device the inputs live on is restored for the
recomputation (dropout draws the same mask), and so are the named states of an
:class:`RNGStatesTracker` (tensor-parallel regions draw from their own stream).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from zero_comm import Communicator

from ._rng import RNGStatesTracker

__all__ = ["ActivationCheckpointConfig", "ActivationCheckpointing", "CheckpointStats"]

_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_flash_attention_for_cpu")


class ActivationCheckpointConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """DeepSpeed's ``activation_checkpointing`` block (same keys, same meaning), plus ``selective``:
    names of aten ops whose outputs are kept (``["matmul"]`` is shorthand for the matmul family)."""

    partition_activations: bool = False
    cpu_checkpointing: bool = False
    contiguous_memory_optimization: bool = False  # accepted; the caching allocator makes it moot
    number_checkpoints: int | None = None
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False
    selective: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.number_checkpoints is not None and self.number_checkpoints < 1:
            raise ValueError(f"activation_checkpointing.number_checkpoints must be >= 1, "
                             f"got {self.number_checkpoints}")


@dataclass
class CheckpointStats:
    """What the checkpoints kept, by where it went (bytes, cumulative)."""

    kept_bytes: int = 0  # inputs kept on their own device
    offloaded_bytes: int = 0  # copied to host memory (cpu_checkpointing)
    partitioned_bytes: int = 0  # this rank's share of partitioned inputs
    recomputations: int = 0
    events: list[str] = field(default_factory=list)


class ActivationCheckpointing:
    """Checkpointed calls configured once (DeepSpeed's ``checkpointing.configure``).

    ``tp_comm`` is the tensor-parallel group ``partition_activations`` splits across;
    ``rng_tracker`` the model-parallel RNG states to replay in recomputation.
    """

    def __init__(self, config: ActivationCheckpointConfig | None = None, *, tp_comm: Communicator | None = None,
                 rng_tracker: RNGStatesTracker | None = None):
        self.config = config or ActivationCheckpointConfig()
        if self.config.partition_activations and tp_comm is None:
            raise ValueError("partition_activations needs the tensor-parallel group: pass tp_comm=")
        self.tp_comm = tp_comm
        self.rng_tracker = rng_tracker
        self.stats = CheckpointStats()
        self._selective = self._policy(self.config.selective)

    @staticmethod
    def _policy(names: Sequence[str]) -> Callable[..., Any] | None:
        if not names:
            return None
        wanted: set[str] = set()
        for n in names:
            wanted.update(_MATMULS if n == "matmul" else (n,))
        ops = [getattr(torch.ops.aten, n).default for n in sorted(wanted) if hasattr(torch.ops.aten, n)]
        keep = set(ops)

        def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
            return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

        return functools.partial(create_selective_checkpoint_contexts, policy)

    # -- saved-tensor hooks for the kept inputs --------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        nbytes = t.numel() * t.element_size()
        if isinstance(t, nn.Parameter) or not t.is_floating_point():
            self.stats.kept_bytes += nbytes
            return t
        if self.config.partition_activations and self.tp_comm is not None and self.tp_comm.world_size > 1:
            n, r = self.tp_comm.world_size, self.tp_comm.rank
            chunk = -(-t.numel() // n)
            flat = t.detach().reshape(-1)
            mine = flat[r * chunk:(r + 1) * chunk].clone()
            if self.config.cpu_checkpointing:
                mine = _to_host(mine)
                self.stats.offloaded_bytes += mine.numel() * mine.element_size()
            self.stats.partitioned_bytes += mine.numel() * mine.element_size()
            return ("partitioned", mine, t.shape, t.device, t.numel(), chunk)
        if self.config.cpu_checkpointing:
            host = _to_host(t.detach())
            self.stats.offloaded_bytes += nbytes
            return ("host", host, t.device)
        self.stats.kept_bytes += nbytes
        return t

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if packed[0] == "host":
            return packed[1].to(packed[2], non_blocking=True)
        _, mine, shape, device, numel, chunk = packed
        assert self.tp_comm is not None
        mine = mine.to(device)
        if mine.numel() < chunk:
            mine = torch.cat([mine, mine.new_zeros(chunk - mine.numel())])
        full = self.tp_comm.all_gather(mine)
        return full[:numel].view(shape)

    # -- the calls --------------------------------------------------------------------------------
    def checkpoint(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, keeping only its inputs for backward and recomputing the rest."""
        tracker = self.rng_tracker
        recorded = tracker.get_states() if tracker is not None else None
        calls = [0]

        def run(*a: Any, **k: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1 or tracker is None or recorded is None:
                return fn(*a, **k)
            self.stats.recomputations += 1
            current = tracker.get_states()
            tracker.set_states(recorded)  # the recomputation draws what the forward drew
            try:
                return fn(*a, **k)
            finally:
                tracker.set_states(current)

        extra: dict[str, Any] = {"context_fn": self._selective} if self._selective is not None else {}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return torch_checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **extra,
                                    **kwargs)

    def sequential(self, functions: nn.Sequential | Sequence[Callable[[Any], Any]], input: Any,
                   segments: int | None = None) -> Any:
        """Run ``functions`` in order, checkpointing ``segments`` runs of them (the config's
        ``number_checkpoints`` by default; the last segment is not checkpointed, its output is needed
        at once)."""
        fns: list[Callable[[Any], Any]] = list(functions)
        segments = segments or self.config.number_checkpoints or len(fns)
        if not 1 <= segments <= max(len(fns), 1):
            raise ValueError(f"segments must be between 1 and {len(fns)}, got {segments}")
        size = -(-len(fns) // segments)

        def run_segment(start: int, stop: int, x: Any) -> Any:
            for f in fns[start:stop]:
                x = f(x)
            return x

        x = input
        for start in range(0, len(fns), size):
            stop = min(start + size, len(fns))
            if stop == len(fns):
                return run_segment(start, stop, x)
            x = self.checkpoint(functools.partial(run_segment, start, stop), x)
        return x


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    host.copy_(t, non_blocking=True)
    return host
