"""ZeroOptimizer: data-parallel training whose optimizer state is partitioned (ZeRO stages 0-2).

Stage 0 is plain data parallelism: gradients are all-reduced and every rank keeps
the whole fp32 master copy and optimizer state. Stage 1 partitions the master
weights and optimizer state: each rank reduce-scatters the gradients, updates its
shard and all-gathers the new weights. Stage 2 also partitions gradients: each
bucket is reduce-scattered to its owners from a hook as soon as its last
gradient is ready, overlapping the rest of backward, so no rank holds them all.

Model parameters become views into one flat buffer per parameter group (in the
training dtype), so the all-gather after a step writes the new weights in place.
Loss scaling, the overflow check and global-norm clipping are done once here, for
every stage, and reach the update rule as one gradient scale.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

import zero_kernels as zk
from zero_comm import Communicator, Handle

from ._layout import Bucket, GroupLayout, build_layout
from ._rules import UpdateRule, check_hyperparameters
from ._scaler import DynamicLossScaler, LossScaleConfig
from ._sharded import ShardedTensor, ShardPiece
from ._store import DeviceStore, StateStore

__all__ = ["ZeroConfig", "ZeroOptimizer"]

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class ZeroConfig:
    """How the optimizer partitions, communicates and scales.

    Args:
        stage: 0 (replicated), 1 (optimizer state partitioned) or 2 (gradients too).
        precision: the dtype of model weights and gradients; master weights are fp32.
        bucket_numel: elements per communication bucket: bigger buckets mean fewer,
            more efficient collectives and, in stage 2, more memory in flight.
        align: every bucket is padded to a multiple of ``world_size * align``.
        accumulation_steps: micro-steps per optimizer step; ``backward`` divides the
            loss by it.
        clip_grad_norm: clip the global gradient norm (over all partitions) to this.
        loss_scale: fp16 dynamic loss scaling (ignored for fp32 and bf16).
        overlap_comm: stage 2 launches each bucket's reduce-scatter from the backward
            hook and waits at the end of backward; off, it waits at once.
    """

    stage: int = 0
    precision: Precision = "fp32"
    bucket_numel: int = 1 << 24
    align: int = 64
    accumulation_steps: int = 1
    clip_grad_norm: float | None = None
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    overlap_comm: bool = True

    def __post_init__(self) -> None:
        for name in ("stage", "bucket_numel", "align", "accumulation_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"ZeroConfig.{name} must be an integer, got {value!r}")
        if self.stage not in (0, 1, 2):
            raise ValueError(f"ZeroConfig.stage must be 0, 1 or 2 (stage 3 is a separate optimizer), "
                             f"got {self.stage!r}")
        if self.precision not in _DTYPES:
            raise ValueError(f"ZeroConfig.precision must be one of {', '.join(_DTYPES)}, got {self.precision!r}")
        for name in ("bucket_numel", "align", "accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"ZeroConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        clip = self.clip_grad_norm
        if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ValueError(f"ZeroConfig.clip_grad_norm must be a finite positive number, got {clip!r}")
        if isinstance(self.loss_scale, Mapping):  # the fp16 block of a config file
            object.__setattr__(self, "loss_scale", LossScaleConfig(**self.loss_scale))
        if not isinstance(self.loss_scale, LossScaleConfig):
            raise ValueError(f"ZeroConfig.loss_scale must be a LossScaleConfig or a dict of its fields, "
                             f"got {self.loss_scale!r}")


@dataclass
class _Group:
    hparams: dict[str, Any]
    layout: GroupLayout
    flat: torch.Tensor  # the model's weights, training dtype, padded layout
    master_key: str
    state_keys: dict[str, str]
    flat_grad: torch.Tensor | None = None  # stages 0-1: the whole gradient, laid out like ``flat``
    grad_shard: torch.Tensor | None = None  # stage 2: only this rank's part
    staging: dict[int, torch.Tensor] = field(default_factory=dict)  # stage 2: buckets being filled
    filled: dict[int, int] = field(default_factory=dict)
    ready: set[int] = field(default_factory=set)  # stage 2: complete, waiting for their turn
    next_bucket: int = 0  # stage 2: buckets are reduced in index order, the same on every rank


class ZeroOptimizer:
    """Partition the optimizer of a data-parallel model over ``comm``'s ranks.

    Usage, per optimizer step::

        for micro_batch in micro_batches:          # config.accumulation_steps of them
            opt.backward(model(micro_batch))
        opt.step()                                  # False if the step was skipped (overflow)

    ``params`` is an iterable of parameters, of ``(name, parameter)`` pairs
    (``model.named_parameters()``), or of torch-style group dicts
    (``{"params": [...], "weight_decay": 0.0}``); parameters that do not require
    grad are left out. ``comm`` is the data-parallel group.

    Build it after the model is on its device: the parameters become views into the
    optimizer's flat buffer, in the training dtype (``config.precision``: a bf16 or
    fp16 model takes inputs of that dtype). Moving or casting the model afterwards
    detaches it from the optimizer, which ``step`` detects and refuses.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], rule: UpdateRule, *,
                 comm: Communicator, config: ZeroConfig | None = None, store: StateStore | None = None,
                 names: Mapping[torch.nn.Parameter, str] | None = None):
        if isinstance(rule, type):
            raise TypeError(f"rule must be an update rule instance, e.g. {rule.__name__}(lr=...), not the class")
        if not isinstance(rule, UpdateRule):
            raise TypeError(f"rule must satisfy zero_optim.UpdateRule (AdamW(), Adam(), Lion(), SGD()), got {rule!r}")
        if not isinstance(comm, Communicator):
            raise TypeError(f"comm must be a zero_comm Communicator (e.g. zero_comm.init_distributed()), got {comm!r}")
        self.config = config or ZeroConfig()
        self.rule, self.comm = rule, comm
        self.store: StateStore = store if store is not None else DeviceStore()
        self.dtype = _DTYPES[self.config.precision]
        self.scaler = DynamicLossScaler(self.config.loss_scale) if self.config.precision == "fp16" else None
        self.step_count = 0
        self.skipped_steps = 0
        self.micro_steps = 0
        self.last_grad_norm: float | None = None
        self._pending: list[tuple[Handle, Callable[[], object] | None]] = []
        self._boundary = False  # inside the backward of the last micro-step before a step
        self._reduced = False  # that backward has launched every bucket's reduction
        self._hooks: list[Any] = []
        self._given_names: Mapping[torch.nn.Parameter, str] = {}
        shard_world = 1 if self.config.stage == 0 else comm.world_size
        self._shard_rank = 0 if self.config.stage == 0 else comm.rank
        self.groups: list[_Group] = []
        for g, (group_params, hparams) in enumerate(self._split_groups(params)):
            self.groups.append(self._build_group(g, group_params, hparams, shard_world))
        if not self.groups:
            raise ValueError("ZeroOptimizer got no parameters that require grad")
        for group in self.groups:
            for p in group.layout.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(group, p)))
        ordered = [p for group in self.groups for p in reversed(group.layout.params)]
        names = names if names is not None else self._given_names
        self.names = {id(p): names.get(p, f"param{i}") for i, p in enumerate(ordered)}
        # where each parameter's storage must stay: the flat buffer (see _check_params_in_place)
        self._expected_ptrs = [(p, p.data_ptr()) for p in ordered]

    # -- construction ------------------------------------------------------------------
    def _split_groups(self, params: Iterable[Any]) -> list[tuple[list[torch.nn.Parameter], dict[str, Any]]]:
        items = list(params)
        if items and isinstance(items[0], tuple):  # model.named_parameters(): take the names too
            self._given_names = {p: n for n, p in items}
            items = [p for _, p in items]
        dict_groups = items if items and isinstance(items[0], dict) else [{"params": items}]
        out, seen, device = [], set(), None
        for i, group in enumerate(dict_groups):
            if "params" not in group:
                raise ValueError(f"parameter group {i} has no 'params' entry (keys: {sorted(group)})")
            check_hyperparameters(self.rule, group, f"parameter group {i}")
            group_params = list(group["params"])
            for p in group_params:
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"parameter group {i} holds a {type(p).__name__}, not a parameter")
            trainable = [p for p in group_params if p.requires_grad]
            for p in trainable:
                if id(p) in seen:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} appears in more than one group")
                seen.add(id(p))
                if device is None:
                    device = p.device
                elif p.device != device:
                    raise ValueError(f"parameters are on mixed devices ({device} and {p.device}); "
                                     "a ZeroOptimizer needs all of its parameters on one device")
            if trainable:
                hparams = {**self.rule.defaults, **{k: v for k, v in group.items() if k != "params"}}
                out.append((trainable, hparams))
        return out

    def _build_group(self, g: int, params: list[torch.nn.Parameter], hparams: dict[str, Any],
                     shard_world: int) -> _Group:
        layout = build_layout(params, shard_world, self.config.bucket_numel, self.config.align)
        device = params[0].device
        flat = torch.zeros(layout.total, dtype=self.dtype, device=device)
        for bucket in layout.buckets:
            for p, off in zip(bucket.params, bucket.offsets, strict=True):
                view = flat[bucket.base + off:bucket.base + off + p.numel()].view(p.shape)
                view.copy_(p.detach())
                p.data = view  # the model now reads its weights from the flat buffer
        if self.comm.world_size > 1:
            self.comm.broadcast(flat, 0)  # every rank starts from rank 0's weights
        master = self._own_chunks(layout, flat).float()
        master_key = f"group{g}.master"
        self.store.create(master_key, master)
        state_keys = {}
        for name in self.rule.state_names:
            state_keys[name] = f"group{g}.{name}"
            self.store.create(state_keys[name], torch.zeros_like(master))
        group = _Group(hparams, layout, flat, master_key, state_keys)
        if self.config.stage < 2:
            group.flat_grad = torch.zeros_like(flat)
        else:
            group.grad_shard = torch.zeros(layout.shard_numel, dtype=self.dtype, device=device)
        return group

    def _own(self, bucket: Bucket, flat: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of ``bucket`` inside a buffer laid out like the flat weights."""
        r = self._shard_rank
        return bucket.region(flat)[r * bucket.chunk:(r + 1) * bucket.chunk]

    def _own_chunks(self, layout: GroupLayout, flat: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._own(b, flat) for b in layout.buckets])

    def _grad_chunk(self, group: _Group, bucket: Bucket) -> torch.Tensor:
        """The reduced gradient of this rank's chunk of ``bucket`` (after ``_reduce_gradients``)."""
        if group.grad_shard is not None:
            return bucket.chunk_of(group.grad_shard)
        assert group.flat_grad is not None
        return self._own(bucket, group.flat_grad)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Each group's hyper-parameters, mutable: set ``param_groups[i]["lr"]`` to schedule the LR.

        (torch.optim.lr_scheduler classes insist on a torch.optim.Optimizer; zero-all's engine
        drives schedules for a ZeroOptimizer.)"""
        return [g.hparams for g in self.groups]

    # -- backward ------------------------------------------------------------------------
    def _make_hook(self, group: _Group, p: torch.nn.Parameter):
        b_index, offset = group.layout.where[id(p)]
        bucket = group.layout.buckets[b_index]

        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            param.grad = None  # the flat buffers own gradients from here on
            if grad is None:
                return
            if group.flat_grad is not None:  # stages 0-1: accumulate in place
                start = bucket.base + offset
                group.flat_grad[start:start + param.numel()].view(param.shape).add_(grad)
            else:  # stage 2: stage the bucket, to be reduce-scattered and dropped
                staging = group.staging.get(b_index)
                if staging is None:
                    staging = torch.zeros(bucket.padded, dtype=self.dtype, device=grad.device)
                    group.staging[b_index] = staging
                staging[offset:offset + param.numel()].view(param.shape).copy_(grad)
            if self._boundary:
                group.filled[b_index] = group.filled.get(b_index, 0) + param.numel()
                if group.filled[b_index] == bucket.numel:
                    group.ready.add(b_index)
                    self._launch_ready(group, flush=False)

        return hook

    def _launch_ready(self, group: _Group, flush: bool) -> None:
        """Launch the reduction of complete buckets, in index order (collectives must match across
        ranks); with ``flush`` the rest go too, a gradient that never came counting as zero."""
        while group.next_bucket < len(group.layout.buckets):
            b_index = group.next_bucket
            if not flush and b_index not in group.ready:
                return
            group.ready.discard(b_index)
            group.filled.pop(b_index, None)
            self._launch_bucket(group, group.layout.buckets[b_index], group.staging.pop(b_index, None))
            group.next_bucket += 1

    def _launch_bucket(self, group: _Group, bucket: Bucket, staging: torch.Tensor | None) -> None:
        """Stage 0: all-reduce the bucket. Stage 1: reduce-scatter it, keeping this rank's chunk in
        place. Stage 2: reduce-scatter the staged bucket and add the chunk to the gradient shard."""
        if self.config.stage == 0:
            assert group.flat_grad is not None
            handle = self.comm.all_reduce(bucket.region(group.flat_grad), "avg", async_op=True)
            self._pending.append((handle, None))
        elif self.config.stage == 1:
            assert group.flat_grad is not None
            own = self._own(bucket, group.flat_grad)
            reduced = torch.empty_like(own)
            handle = self.comm.reduce_scatter(bucket.region(group.flat_grad), "avg", out=reduced, async_op=True)
            self._pending.append((handle, lambda: own.copy_(reduced)))
        else:
            assert group.grad_shard is not None
            if staging is None:  # no parameter of this bucket got a gradient in this micro-step
                staging = torch.zeros(bucket.padded, dtype=self.dtype, device=group.flat.device)
            chunk = bucket.chunk_of(group.grad_shard)
            if self.micro_steps == 0:  # the first micro-step since zero_grad: reduce straight into the shard
                handle = self.comm.reduce_scatter(staging, "avg", out=chunk, async_op=True)
                self._pending.append((handle, None))
            else:
                reduced = torch.empty_like(chunk)
                handle = self.comm.reduce_scatter(staging, "avg", out=reduced, async_op=True)
                self._pending.append((handle, lambda: chunk.add_(reduced)))
        if not self.config.overlap_comm:
            self._drain()

    def _drain(self) -> None:
        for handle, finish in self._pending:
            handle.wait()
            if finish is not None:
                finish()
        self._pending.clear()

    def _flush(self) -> None:
        for group in self.groups:
            self._launch_ready(group, flush=True)
            group.next_bucket = 0
        self._reduced = True

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's loss (scaled for fp16 and for accumulation).

        On the last micro-step before an optimizer step (every micro-step in stage 2)
        each bucket's reduction starts from the backward hook of its last gradient,
        overlapping the rest of backward, as DDP does.
        """
        scale = (self.scaler.scale if self.scaler else 1.0) / self.config.accumulation_steps
        self._boundary = self.config.stage == 2 or (self.micro_steps + 1) % self.config.accumulation_steps == 0
        try:
            (loss * scale).backward()
        finally:
            self._boundary = False
        if self.config.stage == 2 or (self.micro_steps + 1) % self.config.accumulation_steps == 0:
            self._flush()
        if self.config.stage == 2:
            self._drain()  # the staged buckets are freed; the next micro-step may stage again
        self.micro_steps += 1

    # -- step ------------------------------------------------------------------------------
    def _reduce_gradients(self) -> None:
        """Finish the gradient reduction (launching it now if no boundary backward did)."""
        if not self._reduced:
            self._flush()
        self._drain()
        self._reduced = False

    def _global_norm(self, grads: list[torch.Tensor]) -> tuple[float, bool]:
        sumsq, nonfinite = zk.grad_norm_sq(grads)
        if self.config.stage >= 1 and self.comm.world_size > 1:  # each rank saw only its shard
            both = torch.stack([sumsq, nonfinite.float()])
            self.comm.all_reduce(both)
            sumsq, nonfinite = both[0], both[1] > 0
        return math.sqrt(max(float(sumsq), 0.0)), bool(nonfinite)

    def step(self) -> bool:
        """Reduce gradients, check for overflow, clip, update, share the new weights.

        Returns False when the step was skipped because a gradient held inf or NaN on
        some rank (all ranks skip together; fp16 also lowers its loss scale).
        """
        self._check_params_in_place()
        self._reduce_gradients()
        grads = [self._grad_chunk(g, b) for g in self.groups for b in g.layout.buckets]
        scaled_norm, overflow = self._global_norm(grads)
        loss_scale = self.scaler.scale if self.scaler else 1.0
        if overflow:
            self.skipped_steps += 1
            if self.scaler:
                self.scaler.update(True)
            else:
                warnings.warn("a gradient held inf or NaN: the step was skipped on every rank", stacklevel=2)
            self.zero_grad()
            return False
        self.last_grad_norm = scaled_norm / loss_scale
        clip = 1.0
        if self.config.clip_grad_norm is not None:
            clip = min(1.0, self.config.clip_grad_norm / (self.last_grad_norm + 1e-6))
        self.step_count += 1
        if getattr(self.rule, "needs_parameter_norms", False):
            handles = self._trust_ratio_update(clip / loss_scale)
        else:
            handles = self._update(clip / loss_scale)
        for h in handles:
            h.wait()
        if self.scaler:
            self.scaler.update(False)
        self.zero_grad()
        return True

    def _group_state(self, group: _Group) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.store.get(group.master_key), {n: self.store.get(k) for n, k in group.state_keys.items()}

    def _store_back(self, group: _Group, master: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        self.store.put(group.master_key, master)
        for name, key in group.state_keys.items():
            self.store.put(key, state[name])

    def _publish(self, group: _Group, bucket: Bucket) -> list[Handle]:
        """Stages 1-2: all-gather this rank's new weights of ``bucket`` into every rank's model."""
        if self.config.stage == 0:
            return []
        return [self.comm.all_gather(self._own(bucket, group.flat), out=bucket.region(group.flat), async_op=True)]

    def _update(self, grad_scale: float) -> list[Handle]:
        """One fused pass per bucket chunk, writing the new weights in place; returns the all-gathers."""
        handles = []
        for group in self.groups:
            master, state = self._group_state(group)
            for bucket in group.layout.buckets:
                self.rule.update(bucket.chunk_of(master), self._grad_chunk(group, bucket),
                                 {name: bucket.chunk_of(t) for name, t in state.items()}, step=self.step_count,
                                 hparams=group.hparams, grad_scale=grad_scale, lowp_out=self._own(bucket, group.flat))
                handles += self._publish(group, bucket)
            self._store_back(group, master, state)
        return handles

    def _segments(self, bucket: Bucket) -> list[tuple[torch.nn.Parameter, int, int, int]]:
        """``(parameter, start in the parameter, start in this rank's chunk, length)`` for every
        parameter that this rank's chunk of ``bucket`` holds part of."""
        lo, hi = self._shard_rank * bucket.chunk, (self._shard_rank + 1) * bucket.chunk
        out = []
        for p, off in zip(bucket.params, bucket.offsets, strict=True):
            start, stop = max(off, lo), min(off + p.numel(), hi)
            if start < stop:
                out.append((p, start - off, start - lo, stop - start))
        return out

    def _trust_ratio_update(self, grad_scale: float) -> list[Handle]:
        """Rules whose step depends on whole-parameter norms (LAMB): directions on every chunk,
        one all-reduce of per-parameter sums of squares, then the scaled updates."""
        rule: Any = self.rule
        params = [p for g in self.groups for p in g.layout.params]
        index = {id(p): k for k, p in enumerate(params)}
        sums = torch.zeros(2, len(params), dtype=torch.float64, device=self.groups[0].flat.device)
        work, fetched = [], []
        for group in self.groups:
            master, state = self._group_state(group)
            fetched.append((group, master, state))
            for bucket in group.layout.buckets:
                weights = bucket.chunk_of(master)
                u = rule.direction(weights, self._grad_chunk(group, bucket),
                                   {name: bucket.chunk_of(t) for name, t in state.items()}, step=self.step_count,
                                   hparams=group.hparams, grad_scale=grad_scale)
                segments = self._segments(bucket)
                for p, _, at, n in segments:
                    sums[0, index[id(p)]] += weights[at:at + n].double().square().sum()
                    sums[1, index[id(p)]] += u[at:at + n].double().square().sum()
                work.append((group, bucket, weights, u, segments))
        if self.config.stage >= 1 and self.comm.world_size > 1:
            self.comm.all_reduce(sums)
        norms = sums.sqrt().float()
        handles = []
        for group, bucket, weights, u, segments in work:
            ratio = torch.ones_like(u)
            for p, _, at, n in segments:
                k = index[id(p)]
                ratio[at:at + n] = rule.trust(norms[0, k], norms[1, k], group.hparams)
            rule.apply(weights, u, ratio, hparams=group.hparams, lowp_out=self._own(bucket, group.flat))
            handles += self._publish(group, bucket)
        for group, master, state in fetched:
            self._store_back(group, master, state)
        return handles

    def _check_params_in_place(self) -> None:
        for p, ptr in self._expected_ptrs:
            if p.data_ptr() != ptr:
                raise RuntimeError(
                    f"parameter {self.names[id(p)]!r} no longer lives in the optimizer's flat buffer: the model "
                    "was moved or cast (.to(), .float(), .half(), load_state_dict(assign=True)) after the "
                    "ZeroOptimizer was built. Move and cast the model first, then build the optimizer.")

    def zero_grad(self) -> None:
        """Clear the accumulated gradients (``step`` does this itself)."""
        self._drain()
        self._reduced = False
        for group in self.groups:
            group.staging.clear()
            group.filled.clear()
            group.ready.clear()
            group.next_bucket = 0
            if group.flat_grad is not None:
                group.flat_grad.zero_()
            if group.grad_shard is not None:
                group.grad_shard.zero_()
        self.micro_steps = 0

    # -- state ------------------------------------------------------------------------------
    def sharded_state(self) -> dict[str, ShardedTensor]:
        """This rank's pieces of every master weight and rule state, by ``"<state>/<name>"``.

        The pieces are views of the live state: a checkpoint writer copies them out.
        Names come from ``names=`` (e.g. ``{p: n for n, p in model.named_parameters()}``),
        else ``param<i>`` in group order.
        """
        out: dict[str, ShardedTensor] = {}
        for group in self.groups:
            tensors = {"master": self.store.get(group.master_key),
                       **{n: self.store.get(k) for n, k in group.state_keys.items()}}
            for bucket in group.layout.buckets:
                for p, start, at, n in self._segments(bucket):
                    for state_name, t in tensors.items():
                        key = f"{state_name}/{self.names[id(p)]}"
                        entry = out.setdefault(key, ShardedTensor(tuple(p.shape), t.dtype, []))
                        piece = bucket.chunk_of(t)[at:at + n]
                        entry.pieces.append(ShardPiece(start, start + n, piece))
        return out

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the optimizer: master weights, rule state, counters, loss scale."""
        return {
            "stage": self.config.stage, "world_size": self.comm.world_size, "rank": self.comm.rank,
            "step": self.step_count, "skipped_steps": self.skipped_steps,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "hparams": [dict(g.hparams) for g in self.groups],
            "rule": self.rule.name,
            "layout": [[tuple(p.shape) for p in g.layout.params] for g in self.groups],
            "shards": [{"master": self.store.get(g.master_key).clone(),
                        **{n: self.store.get(k).clone() for n, k in g.state_keys.items()}} for g in self.groups],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a shard saved by the same rank of the same layout; resharding is zero-ckpt's job."""
        if state["stage"] != self.config.stage or state["world_size"] != self.comm.world_size:
            raise ValueError(f"sharded optimizer state was saved with stage {state['stage']} on "
                             f"{state['world_size']} ranks; this optimizer is stage {self.config.stage} on "
                             f"{self.comm.world_size} ranks (reshard it with zero-ckpt)")
        if state["rank"] != self.comm.rank:
            raise ValueError(f"this shard belongs to rank {state['rank']}, not rank {self.comm.rank}")
        if state.get("rule", self.rule.name) != self.rule.name:
            raise ValueError(f"optimizer state was saved by {state['rule']}; this optimizer runs {self.rule.name}")
        mine_layout = [[tuple(p.shape) for p in g.layout.params] for g in self.groups]
        if "layout" in state and [[tuple(s) for s in g] for g in state["layout"]] != mine_layout:
            raise ValueError(f"optimizer state was saved for parameters of shapes {state['layout']}; this "
                             f"optimizer has {mine_layout} (a different model or parameter grouping)")
        if len(state["shards"]) != len(self.groups):
            raise ValueError(f"state has {len(state['shards'])} parameter groups; this optimizer has "
                             f"{len(self.groups)}")
        for g, (group, shard) in enumerate(zip(self.groups, state["shards"], strict=True)):
            for name, key in [("master", group.master_key), *group.state_keys.items()]:
                mine = self.store.get(key)
                if shard[name].shape != mine.shape:
                    raise ValueError(f"group {g} {name}: saved shard has {shard[name].numel()} elements, "
                                     f"this layout {mine.numel()} (bucket or alignment settings differ)")
                self.store.put(key, shard[name].to(mine.device))
            group.hparams.update(state["hparams"][g])
            master = self.store.get(group.master_key)
            for bucket in group.layout.buckets:
                self._own(bucket, group.flat).copy_(bucket.chunk_of(master))
        self.step_count, self.skipped_steps = state["step"], state["skipped_steps"]
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.config.stage >= 1:
            for group in self.groups:
                for bucket in group.layout.buckets:
                    self.comm.all_gather(self._own(bucket, group.flat), out=bucket.region(group.flat))
