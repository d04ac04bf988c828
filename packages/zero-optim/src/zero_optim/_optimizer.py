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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from zero_comm import Communicator, Handle

from ._base import Piece, Segment, ShardedOptimizer
from ._config import ZeroConfig
from ._expert import split_by_reduce_group, sums_over_copies
from ._layout import Bucket, GroupLayout, build_layout
from ._rules import UpdateRule, check_hyperparameters
from ._store import DeviceStore, StateStore

__all__ = ["ZeroOptimizer"]

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
    comm: Any = None  # the ranks this group's gradients are reduced over (experts: their own group)
    shard_rank: int = 0  # which chunk of each bucket this rank owns (0 at stage 0)
    grad_factor: float = 1.0  # turns the average over ``comm`` into the average over the data-parallel world

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.layout.params]


class ZeroOptimizer(ShardedOptimizer):
    """Partition the optimizer of a data-parallel model over ``comm``'s ranks.

    Usage, per optimizer step::

        for micro_batch in micro_batches:          # config.accumulation_steps of them
            opt.backward(model(micro_batch))
        opt.step()                                  # False if the step was skipped (overflow)

    ``params`` is an iterable of parameters, of ``(name, parameter)`` pairs
    (``model.named_parameters()``), or of torch-style group dicts
    (``{"params": [...], "weight_decay": 0.0}``); parameters that do not require
    grad are left out. ``comm`` is the data-parallel group. Mixture-of-experts parameters
    (marked ``allreduce = False`` with a ``group_name``) are reduced, and their state
    sharded, over ``expert_comms[group_name]``, the ranks holding the same experts.

    Build it after the model is on its device: the parameters become views into the
    optimizer's flat buffer, in the training dtype (``config.precision``: a bf16 or
    fp16 model takes inputs of that dtype). Moving or casting the model afterwards
    detaches it from the optimizer, which ``step`` detects and refuses.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], rule: UpdateRule, *,
                 comm: Communicator, config: ZeroConfig | None = None, store: StateStore | None = None,
                 names: Mapping[torch.nn.Parameter, str] | None = None,
                 expert_comms: Mapping[str, Communicator] | None = None):
        self.config = config = config or ZeroConfig()
        if config.stage == 3:
            raise ValueError("stage 3 partitions the model's parameters, not just its optimizer: build "
                             "zero_optim.ZeroStage3(model, rule, comm=..., config=...) from the module")
        super().__init__(rule, comm, config.precision, config.loss_scale, config.clip_grad_norm, store)
        self.stage, self.sharded = config.stage, config.stage >= 1
        self._boundary = False  # inside the backward of the last micro-step before a step
        self._reduced = False  # that backward has launched every bucket's reduction
        self._hooks: list[Any] = []
        self._given_names: Mapping[torch.nn.Parameter, str] = {}
        lamb = getattr(rule, "needs_parameter_norms", False)
        split = [(run, hparams, c, factor) for ps, hparams in self._split_groups(params)
                 for run, c, factor in split_by_reduce_group(ps, comm, expert_comms or {},
                                                             names or self._given_names, lamb)]
        self._has_experts = any(c is not comm for _, _, c, _ in split)
        layouts = [build_layout(ps, 1 if config.stage == 0 else c.world_size, config.bucket_numel, config.align)
                   for ps, _, c, _ in split]
        # fp32 weights kept on the device are their own masters: a rank's chunks of them are what it
        # updates (a separate fp32 copy would add 4 bytes per element of its shard to ZeRO's formula)
        self._weights_are_masters = self.dtype == torch.float32 and isinstance(self.store, DeviceStore)
        # master weights and rule state, fp32: refused now if the store cannot hold them
        copies = len(self.rule.state_names) + (0 if self._weights_are_masters else 1)
        self.store.reserve(sum(lay.shard_numel for lay in layouts) * 4 * copies)
        self.groups: list[_Group] = [self._build_group(g, ps, hparams, layout, c, factor)
                                     for g, ((ps, hparams, c, factor), layout) in enumerate(zip(split, layouts))]
        if not self.groups:
            raise ValueError("ZeroOptimizer got no parameters that require grad")
        self.hparams = list({id(g.hparams): g.hparams for g in self.groups}.values())  # split by comm: once
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
                hparams = {"params": trainable, **self.rule.defaults,
                           **{k: v for k, v in group.items() if k != "params"}}
                out.append((trainable, hparams))
        return out

    def _build_group(self, g: int, params: list[torch.nn.Parameter], hparams: dict[str, Any],
                     layout: GroupLayout, comm: Communicator, grad_factor: float) -> _Group:
        device = params[0].device
        flat = torch.zeros(layout.total, dtype=self.dtype, device=device)
        for bucket in layout.buckets:
            for p, off in zip(bucket.params, bucket.offsets, strict=True):
                view = flat[bucket.base + off:bucket.base + off + p.numel()].view(p.shape)
                view.copy_(p.detach())
                p.data = view  # the model now reads its weights from the flat buffer
        if comm.world_size > 1:
            comm.broadcast(flat, 0)  # every rank starts from rank 0's weights
        state_keys = {name: f"group{g}.{name}" for name in self.rule.state_names}
        group = _Group(hparams, layout, flat, f"group{g}.master", state_keys, comm=comm, grad_factor=grad_factor,
                       shard_rank=0 if self.config.stage == 0 else comm.rank)
        if self._weights_are_masters:  # the store keeps an empty placeholder: _pieces reads the weights
            self.store.create(group.master_key, flat.new_empty(0))
        else:
            self.store.create(group.master_key, self._own_chunks(group, flat).float())
        for key in state_keys.values():
            self.store.create(key, torch.zeros(layout.shard_numel, dtype=torch.float32, device=device))
        if self.config.stage < 2:
            group.flat_grad = torch.zeros_like(flat)
        else:
            group.grad_shard = torch.zeros(layout.shard_numel, dtype=self.dtype, device=device)
        return group

    @staticmethod
    def _own(group: _Group, bucket: Bucket, flat: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of ``bucket`` inside a buffer laid out like the flat weights."""
        r = group.shard_rank
        return bucket.region(flat)[r * bucket.chunk:(r + 1) * bucket.chunk]

    def _own_chunks(self, group: _Group, flat: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._own(group, b, flat) for b in group.layout.buckets])

    def _grad_chunk(self, group: _Group, bucket: Bucket) -> torch.Tensor:
        """The reduced gradient of this rank's chunk of ``bucket`` (after ``_reduce_gradients``)."""
        if group.grad_shard is not None:
            return bucket.chunk_of(group.grad_shard)
        assert group.flat_grad is not None
        return self._own(group, bucket, group.flat_grad)

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
                    staging = self._new_staging(bucket.padded, grad.device)
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
        if group.grad_factor != 1.0 and group.flat_grad is not None:  # experts: see _expert.py
            bucket.region(group.flat_grad).mul_(group.grad_factor)
        if self.config.stage == 0:
            assert group.flat_grad is not None
            handle = group.comm.all_reduce(bucket.region(group.flat_grad), "avg", async_op=True)
            self._pending.append((handle, None))
        elif self.config.stage == 1:
            assert group.flat_grad is not None
            own = self._own(group, bucket, group.flat_grad)
            reduced = torch.empty_like(own)
            handle = group.comm.reduce_scatter(bucket.region(group.flat_grad), "avg", out=reduced, async_op=True,
                                              consume_input=True)
            self._pending.append((handle, lambda: own.copy_(reduced)))
            # each holds a chunk's worth of reduced gradients until it lands: at most two in flight, as
            # stage 2 (every bucket in flight at once kept a gradient shard's worth alive to the step)
            self._drain(keep=1 if self.config.overlap_comm else 0)
            return
        else:
            assert group.grad_shard is not None
            if staging is None:  # no parameter of this bucket got a gradient in this micro-step
                staging = self._new_staging(bucket.padded, group.flat.device)
            if group.grad_factor != 1.0:
                staging.mul_(group.grad_factor)
            chunk = bucket.chunk_of(group.grad_shard)
            done = staging
            if self.micro_steps == 0:  # the first micro-step since zero_grad: reduce straight into the shard
                handle = group.comm.reduce_scatter(staging, "avg", out=chunk, async_op=True, consume_input=True)
                self._pending.append((handle, lambda: self._staging_pool.append(done)))
            else:
                reduced = torch.empty_like(chunk)
                handle = group.comm.reduce_scatter(staging, "avg", out=reduced, async_op=True, consume_input=True)

                def finish() -> None:
                    chunk.add_(reduced)
                    self._staging_pool.append(done)

                self._pending.append((handle, finish))
            # each reduction in flight holds a bucket of gradients: at most two in flight
            self._drain(keep=1 if self.config.overlap_comm else 0)
            return
        if not self.config.overlap_comm:
            self._drain()

    def _flush(self) -> None:
        for group in self.groups:
            self._launch_ready(group, flush=True)
            group.next_bucket = 0
        self._reduced = True

    def backward(self, loss: torch.Tensor, *, boundary: bool | None = None, scale_wrt_gas: bool = True,
                 retain_graph: bool = False) -> None:
        """Back-propagate one micro-batch's loss (scaled for fp16 and for accumulation).

        On the last micro-step before an optimizer step (every micro-step in stage 2)
        each bucket's reduction starts from the backward hook of its last gradient,
        overlapping the rest of backward, as DDP does. ``boundary`` says whether this is
        that last micro-step (default: every ``accumulation_steps``-th since the last
        step); at stages 0-1 ``boundary=False`` keeps the gradients local, to be reduced
        by a later boundary backward or by ``step`` (stage 2 reduces every micro-step).
        """
        scale = self._loss_multiplier(scale_wrt_gas)
        if boundary is None:
            boundary = (self.micro_steps + 1) % self.config.accumulation_steps == 0
        boundary = boundary or self.config.stage == 2
        if self._reduced and self.config.stage < 2:
            raise RuntimeError("a backward after the micro-step that ended the accumulation (its gradients are "
                               "already being reduced): step() first, or pass boundary=False to the earlier ones")
        self._boundary = boundary
        try:
            (loss * scale).backward(retain_graph=retain_graph)
        finally:
            self._boundary = False
        if boundary:
            self._flush()
        if boundary or self.config.stage == 2:
            # backward is over, nothing is left to overlap: land every reduction now, so no bucket's
            # gradients wait beside the model states (as a chunk's worth did at stage 1 until step)
            self._drain()
            self._keep_small_staging()
        self.micro_steps += 1

    def _keep_small_staging(self) -> None:
        """Between micro-steps keep staging buffers for reuse only up to a sixteenth of the model's
        gradients: a bucket as large as the model (DeepSpeed's default ``reduce_bucket_size`` of 5e8 on
        a smaller model) would otherwise hold a model-sized buffer beside the model states until the
        next backward. Smaller buckets stay pooled, sparing their page faults on every micro-step."""
        budget = sum(g.layout.total for g in self.groups) // 16
        kept = []
        for buf in self._staging_pool:
            if buf.numel() <= budget:
                kept.append(buf)
                budget -= buf.numel()
        self._staging_pool[:] = kept

    def _global_norm(self, grads: Iterable[torch.Tensor]) -> tuple[float, bool]:
        if self.sharded or not self._has_experts:
            return super()._global_norm(grads)
        # stage 0 with experts: ranks hold different experts, each whole on its group (see _expert.py)
        both = sums_over_copies([([self._grad_chunk(g, b) for b in g.layout.buckets], g.comm.world_size)
                                 for g in self.groups]).to(self.groups[0].flat.device)
        self.comm.all_reduce(both)
        if self.whole_model_norm is not None:
            both = self.whole_model_norm(both)
        return math.sqrt(max(float(both[0]), 0.0)), bool(both[1] > 0)

    # -- step ------------------------------------------------------------------------------
    def _reduce_gradients(self) -> None:
        """Finish the gradient reduction (launching it now if no boundary backward did)."""
        if not self._reduced:
            self._flush()
        self._drain()
        self._reduced = False

    # -- step --------------------------------------------------------------------------------
    def _prepare_step(self) -> list[torch.Tensor]:
        self._check_params_in_place()
        self._reduce_gradients()
        return [self._grad_chunk(g, b) for g in self.groups for b in g.layout.buckets]

    def _owners(self) -> list[_Group]:
        return self.groups

    def _pieces(self, group: _Group, master: torch.Tensor, state: dict[str, torch.Tensor]) -> list[Piece]:
        pieces = []
        for bucket in group.layout.buckets:
            weights = self._own(group, bucket, group.flat)
            if self._weights_are_masters:  # updated in place: nothing to copy into the model afterwards
                master_chunk, lowp_out = weights, None
            else:
                master_chunk, lowp_out = bucket.chunk_of(master), weights
            pieces.append(Piece(group.hparams, master_chunk, self._grad_chunk(group, bucket),
                                {name: bucket.chunk_of(t) for name, t in state.items()}, lowp_out,
                                self._segments(group, bucket), self._publisher(group, bucket)))
        return pieces

    def _master_shard(self, owner: _Group) -> torch.Tensor:  # type: ignore[override]
        if self._weights_are_masters:
            return self._own_chunks(owner, owner.flat)  # a copy of this rank's chunks of the weights
        return super()._master_shard(owner)

    def _put_master_shard(self, owner: _Group, value: torch.Tensor) -> None:  # type: ignore[override]
        if not self._weights_are_masters:
            super()._put_master_shard(owner, value)
            return
        for bucket in owner.layout.buckets:
            self._own(owner, bucket, owner.flat).copy_(bucket.chunk_of(value))

    def _publisher(self, group: _Group, bucket: Bucket) -> Callable[[], list[Handle]] | None:
        """Stages 1-2: all-gather this rank's new weights of ``bucket`` into every rank's model."""
        if self.config.stage == 0:
            return None
        return lambda: [group.comm.all_gather(self._own(group, bucket, group.flat), out=bucket.region(group.flat),
                                             async_op=True)]

    def _segments(self, group: _Group, bucket: Bucket) -> list[Segment]:
        """``(parameter, start in the parameter, start in this rank's chunk, length)`` for every
        parameter that this rank's chunk of ``bucket`` holds part of."""
        lo, hi = group.shard_rank * bucket.chunk, (group.shard_rank + 1) * bucket.chunk
        out = []
        for p, off in zip(bucket.params, bucket.offsets, strict=True):
            start, stop = max(off, lo), min(off + p.numel(), hi)
            if start < stop:
                out.append((p, start - off, start - lo, stop - start))
        return out

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups for p in g.layout.params]

    def _names(self) -> dict[int, str]:
        return self.names

    def _after_update(self) -> None:
        """Nothing: ``_publisher`` already sent every bucket's new weights."""

    def _after_load(self) -> None:
        for group in self.groups:
            if self._weights_are_masters:  # loaded straight into this rank's chunks of the weights
                continue
            master = self.store.get(group.master_key)
            for bucket in group.layout.buckets:
                self._own(group, bucket, group.flat).copy_(bucket.chunk_of(master))
            self.store.release(group.master_key)
        if self.config.stage >= 1:
            for group in self.groups:
                for bucket in group.layout.buckets:
                    group.comm.all_gather(self._own(group, bucket, group.flat), out=bucket.region(group.flat))

    def refresh_master_weights(self) -> None:
        """Copy the model's weights into the fp32 master weights, after they were changed outside
        ``step`` (a state dict loaded into the model), so that training continues from them. Every
        rank calls it, holding the same weights; with bf16 or fp16 the masters get the rounded values."""
        self._check_params_in_place()
        if self._weights_are_masters:  # nothing apart from the weights to refresh
            return
        for group in self.groups:
            self.store.put(group.master_key, self._own_chunks(group, group.flat).float())

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

