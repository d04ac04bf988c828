"""What every ZeRO stage shares: the optimizer step, written once.

A stage decides how gradients are reduced and where each rank's shard of the fp32
master weights lives; the step itself is the same for all of them: finish the
reduction, one global-norm pass (over all partitions) that also detects overflow,
loss-scale and clipping folded into one gradient scale, the update rule over each
piece of the shard, and the new weights published to the model. Checkpoint views
and state dicts walk the same pieces.

The unit of storage is an *owner*: a flat fp32 master shard and the rule's state
tensors, kept in the :class:`StateStore` under the owner's keys. A stage splits
each owner into :class:`Piece` s, runs of the shard that share hyper-parameters,
each knowing which parameter elements it holds.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.utils.hooks import RemovableHandle

import zero_kernels as zk
from zero_comm import Communicator, Handle

from ._rules import UpdateRule
from ._scaler import DynamicLossScaler, LossScaleConfig
from ._sharded import ShardedTensor, ShardPiece
from ._store import DeviceStore, StateStore

if TYPE_CHECKING:
    from ._config import ZeroConfig

__all__ = ["Owner", "Piece", "ShardedOptimizer"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (parameter, first element in the parameter, first element in the piece, length)
Segment = tuple[torch.nn.Parameter, int, int, int]


class Owner(Protocol):
    master_key: str
    state_keys: dict[str, str]

    @property
    def shapes(self) -> list[tuple[int, ...]]: ...


@dataclass
class Piece:
    """A run of an owner's shard that one call of the update rule moves."""

    hparams: dict[str, Any]
    master: torch.Tensor  # fp32 view into the owner's master shard
    grad: torch.Tensor  # the reduced gradient of the same elements
    state: dict[str, torch.Tensor]  # views into the rule's state tensors
    lowp_out: torch.Tensor | None  # where the model reads these weights (training dtype)
    segments: list[Segment]
    publish: Callable[[], list[Handle]] | None = None  # share the new weights once written


def check_rule_and_comm(rule: Any, comm: Any) -> None:
    if isinstance(rule, type):
        raise TypeError(f"rule must be an update rule instance, e.g. {rule.__name__}(lr=...), not the class")
    if not isinstance(rule, UpdateRule):
        raise TypeError(f"rule must satisfy zero_optim.UpdateRule (AdamW(), Adam(), Lion(), SGD()), got {rule!r}")
    if not isinstance(comm, Communicator):
        raise TypeError(f"comm must be a zero_comm Communicator (e.g. zero_comm.init_distributed()), got {comm!r}")


class ShardedOptimizer(abc.ABC):
    """The step, state views and state dicts of a ZeRO optimizer; subclasses supply the layout."""

    stage: int
    sharded: bool  # each rank holds only part of the gradients and master weights
    config: ZeroConfig

    def __init__(self, rule: UpdateRule, comm: Communicator, precision: str, loss_scale: LossScaleConfig,
                 clip_grad_norm: float | None, store: StateStore | None) -> None:
        check_rule_and_comm(rule, comm)
        self.rule, self.comm = rule, comm
        self.store: StateStore = store if store is not None else DeviceStore()
        self.dtype = DTYPES[precision]
        self.scaler = DynamicLossScaler(loss_scale) if precision == "fp16" else None
        self.clip_grad_norm = clip_grad_norm
        self.step_count = 0
        self.skipped_steps = 0
        self.overflow = False  # whether the last step was skipped for inf/NaN gradients (DeepSpeed's name)
        self.micro_steps = 0
        self.last_grad_norm: float | None = None
        self.hparams: list[dict[str, Any]] = []
        # copies sharded_state() took out of an offload store, for load_checkpoint_meta to put back
        self._detached: list[tuple[Any, torch.Tensor, dict[str, torch.Tensor]]] = []
        # an OrderedDict, as torch keeps hooks: RemovableHandle holds a weak reference to it
        self._step_pre_hooks: OrderedDict[int, Callable[[ShardedOptimizer], None]] = OrderedDict()
        # gradient reductions in flight, each with what to do once it has finished
        self._pending: list[tuple[Handle, Callable[[], object] | None]] = []
        # stage 2: bucket staging buffers whose reduction finished, to be reused (a new one would
        # fault in its pages every micro-step)
        self._staging_pool: list[torch.Tensor] = []
        #: Where this optimizer holds part of a model whose other parts other ranks train (pipeline
        #: stages): given this rank's ``[sum of squared gradients, non-finite flag]`` over its
        #: data-parallel group, returns them for the whole model, so that clipping and skipping an
        #: overflowed step agree everywhere. ``None``: the data-parallel group holds the whole model.
        self.whole_model_norm: Callable[[torch.Tensor], torch.Tensor] | None = None

    # -- supplied by a stage --------------------------------------------------------------
    @abc.abstractmethod
    def _owners(self) -> list[Any]:
        """Where the state lives (each with a master key and state keys), in the same order on every rank."""

    @abc.abstractmethod
    def _pieces(self, owner: Any, master: torch.Tensor, state: dict[str, torch.Tensor]) -> list[Piece]:
        """The runs of ``owner``'s shard that one call of the rule updates."""

    @abc.abstractmethod
    def _prepare_step(self) -> list[torch.Tensor] | Iterator[torch.Tensor]:
        """Finish reducing gradients; return this rank's reduced gradient tensors (an iterator where
        they are streamed from a store)."""

    @abc.abstractmethod
    def _parameters(self) -> list[torch.nn.Parameter]:
        """Every trainable parameter, in an order that is the same on every rank."""

    @abc.abstractmethod
    def _after_update(self) -> None:
        """After every piece was updated and published: a stage's own follow-up (on every rank)."""

    @abc.abstractmethod
    def _after_load(self) -> None:
        """Put freshly loaded master weights into the model."""

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Clear the accumulated gradients (``step`` does this itself)."""

    # -- shared ---------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Each group's hyper-parameters, mutable: set ``param_groups[i]["lr"]`` to schedule the LR.

        As in torch, ``"params"`` lists the group's parameters (those it trains, in the order
        given); the list is for reading: the groups are fixed when the optimizer is built.
        (torch.optim.lr_scheduler classes insist on a torch.optim.Optimizer; zero-all's engine
        drives schedules for a ZeRO optimizer.)"""
        return self.hparams

    @property
    def loss_scale(self) -> float:
        """The fp16 loss scale the next backward multiplies the loss by (1.0 for fp32 and bf16)."""
        return self.scaler.scale if self.scaler else 1.0

    def register_step_pre_hook(self, hook: Callable[[ShardedOptimizer], None]) -> RemovableHandle:
        """Call ``hook(optimizer)`` at the start of every ``step``, before any state changes (torch's
        optimizer hook of the same name; an async checkpoint uses it to finish copying the state)."""
        handle = RemovableHandle(self._step_pre_hooks)
        self._step_pre_hooks[handle.id] = hook
        return handle

    def _loss_multiplier(self, scale_wrt_gas: bool = True) -> float:
        """What a micro-batch's loss is multiplied by before its backward: the fp16 loss scale, divided
        by the micro-batches a step accumulates (unless ``scale_wrt_gas=False``: the caller did)."""
        accumulation = self.config.accumulation_steps if scale_wrt_gas else 1
        return (self.scaler.scale if self.scaler else 1.0) / accumulation

    def _new_staging(self, numel: int, device: torch.device) -> torch.Tensor:
        """A zeroed gradient staging buffer, reused from a reduction that finished if one fits."""
        for i, buf in enumerate(self._staging_pool):
            if buf.numel() == numel and buf.device == device:
                return self._staging_pool.pop(i).zero_()
        return torch.zeros(numel, dtype=self.dtype, device=device)

    def _drain(self, keep: int = 0) -> None:
        """Wait for all but the newest ``keep`` reductions in flight, running each one's follow-up."""
        while len(self._pending) > keep:
            handle, finish = self._pending.pop(0)
            handle.wait()
            if finish is not None:
                finish()
        del self._staging_pool[3:]  # enough for two in flight and one filling

    def _global_norm(self, grads: Iterable[torch.Tensor]) -> tuple[float, bool]:
        if isinstance(grads, list):
            sumsq, nonfinite = zk.grad_norm_sq(grads)
        else:  # streamed from an offload store, one shard at a time
            sumsq, nonfinite = torch.zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.bool)
            for grad in grads:
                s, f = zk.grad_norm_sq([grad])
                sumsq, nonfinite = sumsq + s.cpu(), nonfinite | f.cpu()
        both = torch.stack([sumsq, nonfinite.float()])
        if self.sharded and self.comm.world_size > 1:  # each rank saw only its shard
            self.comm.all_reduce(both)
        if self.whole_model_norm is not None:
            both = self.whole_model_norm(both)
        return math.sqrt(max(float(both[0]), 0.0)), bool(both[1] > 0)

    def step(self) -> bool:
        """Reduce gradients, check for overflow, clip, update, share the new weights.

        Returns False when the step was skipped because a gradient held inf or NaN on
        some rank (all ranks skip together; fp16 also lowers its loss scale).
        """
        for hook in list(self._step_pre_hooks.values()):
            hook(self)
        grads = self._prepare_step()
        scaled_norm, overflow = self._global_norm(grads)
        self.overflow = overflow
        loss_scale = self.scaler.scale if self.scaler else 1.0
        if overflow:
            self.skipped_steps += 1
            if self.scaler:
                self.scaler.update(True)
            elif self.comm.rank == 0:  # every rank skips; one says so
                warnings.warn("a gradient held inf or NaN: the step was skipped on every rank", stacklevel=2)
            self.zero_grad()
            return False
        self.last_grad_norm = scaled_norm / loss_scale
        clip = 1.0
        if self.clip_grad_norm is not None:
            clip = min(1.0, self.clip_grad_norm / (self.last_grad_norm + 1e-6))
        self.step_count += 1
        if getattr(self.rule, "needs_parameter_norms", False):
            handles = self._trust_ratio_update(clip / loss_scale)
        else:
            handles = self._update(clip / loss_scale)
        for h in handles:
            h.wait()
        self._after_update()
        if self.scaler:
            self.scaler.update(False)
        self.zero_grad()
        return True

    def _master_shard(self, owner: Owner) -> torch.Tensor:
        """This rank's fp32 master weights of ``owner`` as one flat tensor (borrowed from the store
        until ``_release``)."""
        return self.store.get(owner.master_key)

    def _put_master_shard(self, owner: Owner, value: torch.Tensor) -> None:
        self.store.put(owner.master_key, value)

    def _keys(self, owner: Owner) -> list[str]:
        """The store keys a step reads for ``owner``, in the order it reads them."""
        return [owner.master_key, *owner.state_keys.values()]

    def _fetch(self, owner: Owner) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.store.get(owner.master_key), {n: self.store.get(k) for n, k in owner.state_keys.items()}

    def _store_back(self, owner: Owner, master: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        self.store.put(owner.master_key, master)
        for name, key in owner.state_keys.items():
            self.store.put(key, state[name])

    def _release(self, owner: Owner) -> None:
        for key in self._keys(owner):
            self.store.release(key)

    @staticmethod
    def _where_state_lives(pieces: list[Piece]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each piece's gradient and weight copy on the device of its master weights: an offloaded
        optimizer steps where its state is. Gradients leave the GPU all at once (into pinned host
        memory, one wait for the lot); each piece's new weights go back (``_send_weights``) while
        the next piece steps."""
        out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        wait: torch.device | None = None
        for piece in pieces:
            device = piece.master.device
            if piece.grad.device == device:
                out.append((piece.grad, piece.lowp_out))
                continue
            pin = piece.grad.device.type == "cuda"
            grad = torch.empty(piece.grad.shape, dtype=piece.grad.dtype, device=device, pin_memory=pin)
            grad.copy_(piece.grad, non_blocking=pin)
            wait = piece.grad.device if pin else wait
            lowp = None
            if piece.lowp_out is not None:
                lowp = torch.empty(piece.lowp_out.shape, dtype=piece.lowp_out.dtype, device=device, pin_memory=pin)
            out.append((grad, lowp))
        if wait is not None:
            torch.cuda.current_stream(wait).synchronize()  # the gradients are on the host now
        return out

    @staticmethod
    def _send_weights(piece: Piece, lowp: torch.Tensor | None, in_flight: list[torch.Tensor]) -> None:
        """Queue the copy of a piece's new weights from where they were computed to the model; on the
        copy's stream, so the all-gather that publishes them comes after it."""
        if lowp is None or piece.lowp_out is None or lowp is piece.lowp_out:
            return
        piece.lowp_out.copy_(lowp, non_blocking=lowp.is_pinned())
        in_flight.append(lowp)  # the host buffer must outlive the copy

    @staticmethod
    def _settle(in_flight: list[torch.Tensor], devices: set[torch.device]) -> None:
        for device in devices:
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
        in_flight.clear()

    def _update(self, grad_scale: float) -> list[Handle]:
        """One fused pass per piece, writing the new weights in place; returns the publishing collectives."""
        handles: list[Handle] = []
        owners = self._owners()
        self.store.prefetch([k for owner in owners for k in self._keys(owner)])
        in_flight: list[torch.Tensor] = []
        devices: set[torch.device] = set()
        for owner in owners:
            master, state = self._fetch(owner)
            pieces = self._pieces(owner, master, state)
            for piece, (grad, lowp) in zip(pieces, self._where_state_lives(pieces), strict=True):
                self.rule.update(piece.master, grad, piece.state, step=self.step_count,
                                 hparams=piece.hparams, grad_scale=grad_scale, lowp_out=lowp)
                self._send_weights(piece, lowp, in_flight)
                if piece.lowp_out is not None:
                    devices.add(piece.lowp_out.device)
                if piece.publish is not None:
                    handles += piece.publish()
            self._store_back(owner, master, state)
        self._settle(in_flight, devices)
        self.store.flush()  # an I/O error surfaces at this step, naming its file
        return handles

    def _trust_ratio_update(self, grad_scale: float) -> list[Handle]:
        """Rules whose step depends on whole-parameter norms (LAMB): directions on every piece,
        one all-reduce of per-parameter sums of squares, then the scaled updates."""
        rule: Any = self.rule
        work, fetched = [], []
        index = {id(p): k for k, p in enumerate(self._parameters())}  # the same on every rank
        for owner in self._owners():
            master, state = self._fetch(owner)
            fetched.append((owner, master, state))
            pieces = self._pieces(owner, master, state)
            for piece, (grad, lowp) in zip(pieces, self._where_state_lives(pieces), strict=True):
                u = rule.direction(piece.master, grad, piece.state, step=self.step_count,
                                   hparams=piece.hparams, grad_scale=grad_scale)
                work.append((piece, u, lowp))
        sums = torch.zeros(2, len(index), dtype=torch.float64, device=fetched[0][1].device)
        for piece, u, _ in work:
            for p, _, at, n in piece.segments:
                sums[0, index[id(p)]] += piece.master[at:at + n].double().square().sum()
                sums[1, index[id(p)]] += u[at:at + n].double().square().sum()
        if self.sharded and self.comm.world_size > 1:
            self.comm.all_reduce(sums)
        norms = sums.sqrt().float()
        handles = []
        in_flight: list[torch.Tensor] = []
        for piece, u, lowp in work:
            ratio = torch.ones_like(u)
            for p, _, at, n in piece.segments:
                k = index[id(p)]
                ratio[at:at + n] = rule.trust(norms[0, k].to(u.device), norms[1, k].to(u.device), piece.hparams)
            rule.apply(piece.master, u, ratio, hparams=piece.hparams, lowp_out=lowp)
            self._send_weights(piece, lowp, in_flight)
            if piece.publish is not None:
                handles += piece.publish()
        for owner, master, state in fetched:
            self._store_back(owner, master, state)
        self._settle(in_flight, {piece.lowp_out.device for piece, _, _ in work if piece.lowp_out is not None})
        self.store.flush()
        return handles

    @abc.abstractmethod
    def _names(self) -> dict[int, str]:
        """Each parameter's name (by ``id``) for the ShardedState view."""

    def sharded_state(self) -> dict[str, ShardedTensor]:
        """This rank's pieces of every master weight and rule state, by ``"<state>/<name>"``.

        With the state in device memory the pieces are views of the live state: a checkpoint
        writer copies them out, a reader fills them in place. With an offload store they are
        copies taken out of the store (so a save never holds the store's buffers; it needs host
        memory for this rank's optimizer state), and ``load_checkpoint_meta`` puts what a reader
        filled into them back into the store.
        """
        out: dict[str, ShardedTensor] = {}
        names = self._names()
        self._detached = []
        for owner in self._owners():
            master, state = ShardedOptimizer._fetch(self, owner)  # master and rule state only
            if self.store.device is not None:  # an offload store: copy out, give the buffers back
                master, state = master.clone(), {n: t.clone() for n, t in state.items()}
                for key in (owner.master_key, *owner.state_keys.values()):
                    self.store.release(key)
                self._detached.append((owner, master, state))
            for piece in self._pieces(owner, master, state):
                for p, start, at, n in piece.segments:
                    for state_name, t in {"master": piece.master, **piece.state}.items():
                        key = f"{state_name}/{names[id(p)]}"
                        entry = out.setdefault(key, ShardedTensor(tuple(p.shape), t.dtype, []))
                        entry.pieces.append(ShardPiece(start, start + n, t[at:at + n]))
        return out

    def checkpoint_meta(self) -> dict[str, Any]:
        """The small values a checkpoint keeps beside ``sharded_state()``: counters, loss scale,
        hyper-parameters (the same on every rank)."""
        self._detached = []  # a save has its own references to the copies it writes
        return {"stage": self.stage, "rule": self.rule.name, "step": self.step_count,
                "skipped_steps": self.skipped_steps, "scaler": self.scaler.state_dict() if self.scaler else None,
                "hparams": [{k: v for k, v in h.items() if k != "params"} for h in self.hparams]}

    def load_checkpoint_meta(self, meta: Mapping[str, Any]) -> None:
        """After a checkpoint reader filled ``sharded_state()``'s pieces in place: restore the counters
        and put the loaded master weights into the model. Any stage and world size may have saved it."""
        self._check_meta(meta)
        for group, saved in zip(self.hparams, meta["hparams"], strict=True):
            group.update(saved)
        self.step_count, self.skipped_steps = meta["step"], meta["skipped_steps"]
        if self.scaler and meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        for owner, master, state in self._detached:  # what the reader filled goes back into the store
            self.store.put(owner.master_key, master)
            for name, key in owner.state_keys.items():
                self.store.put(key, state[name])
        self._detached = []
        self._after_load()

    def _check_meta(self, meta: Mapping[str, Any]) -> None:
        if meta.get("rule", self.rule.name) != self.rule.name:
            raise ValueError(f"the state was saved by {meta['rule']}; this optimizer runs {self.rule.name}")
        if len(meta["hparams"]) != len(self.hparams):
            raise ValueError(f"the state has {len(meta['hparams'])} parameter groups; this optimizer has "
                             f"{len(self.hparams)}")

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the optimizer: master weights, rule state, counters, loss scale."""
        owners = self._owners()
        shards = []
        for o in owners:
            shards.append({"master": self._master_shard(o).clone(),
                           **{n: self.store.get(k).clone() for n, k in o.state_keys.items()}})
            self._release(o)
        return {
            **self.checkpoint_meta(), "world_size": self.comm.world_size, "rank": self.comm.rank,
            "layout": [o.shapes for o in owners], "shards": shards,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a shard saved by the same rank of the same layout; resharding is zero-ckpt's job."""
        if state["stage"] != self.stage or state["world_size"] != self.comm.world_size:
            raise ValueError(f"sharded optimizer state was saved with stage {state['stage']} on "
                             f"{state['world_size']} ranks; this optimizer is stage {self.stage} on "
                             f"{self.comm.world_size} ranks (reshard it with zero-ckpt)")
        if state["rank"] != self.comm.rank:
            raise ValueError(f"this shard belongs to rank {state['rank']}, not rank {self.comm.rank}")
        owners = self._owners()
        mine_layout = [o.shapes for o in owners]
        if "layout" in state and [[tuple(s) for s in g] for g in state["layout"]] != mine_layout:
            raise ValueError(f"optimizer state was saved for parameters of shapes {state['layout']}; this "
                             f"optimizer has {mine_layout} (a different model or parameter grouping)")
        if len(state["shards"]) != len(owners):
            raise ValueError(f"state has {len(state['shards'])} shards; this optimizer has {len(owners)}")
        self._check_meta(state)
        for g, (owner, shard) in enumerate(zip(owners, state["shards"], strict=True)):
            mine = {"master": self._master_shard(owner), **{n: self.store.get(k) for n, k in owner.state_keys.items()}}
            self._release(owner)
            for name, t in mine.items():
                if shard[name].shape != t.shape:
                    raise ValueError(f"shard {g} {name}: saved shard has {shard[name].numel()} elements, "
                                     f"this layout {t.numel()} (bucket or alignment settings differ)")
        for owner, shard in zip(owners, state["shards"], strict=True):
            self._put_master_shard(owner, shard["master"])
            for name, key in owner.state_keys.items():
                self.store.put(key, shard[name])
        self.load_checkpoint_meta(state)  # counters, loss scale, hyper-parameters; weights into the model
