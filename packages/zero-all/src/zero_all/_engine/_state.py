"""The engines' checkpoints: a ZeRO optimizer's shards, the module's extras and the engine's counters.

Besides the optimizer's fp32 masters (``optimizer/master/<name>``) a checkpoint holds the
module's persistent buffers and untrained weights (``module/<name>``) and, as that item's
counters, zero-ckpt's :class:`~zero_ckpt.ModuleRecord`: the ``state_dict`` keys and which
are tied to which, so that ``zero ckpt export`` rebuilds a ``state_dict`` that loads with
``strict=True``.

Saving overwrites an existing tag atomically, as DeepSpeed does (the old copy stays
loadable until the new one is complete; ``latest`` moves last). Loading is all or
nothing across the ranks (zero-ckpt's ``prepare``, then ``apply``): the checkpoint is
verified and staged on every rank, together with this engine's own conditions (the
weights match, the optimizer's rule and groups match, the counters are there); if any
rank cannot load it, every rank raises the same CheckpointError and no rank's model,
optimizer, counters or RNG have changed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import msgspec
import torch
from torch import nn

import zero_ckpt
import zero_comm
import zero_optim
import zero_pipe

from ._monitor import logger

__all__ = ["load_optimizer", "module_extras", "nothing_to_resume", "save_optimizer"]


class _MasterWeights:
    """A ZeRO optimizer's fp32 master weights alone, as a checkpoint item: loading them refreshes the
    model and leaves the optimizer's own state -- rule state, step count, loss scale,
    hyper-parameters -- as it was (its small values are put back as they were before the load)."""

    def __init__(self, optimizer: zero_optim.ShardedOptimizer, keep: Callable[[str], bool]):
        self.optimizer, self.keep = optimizer, keep
        self.meta = optimizer.checkpoint_meta()  # before sharded_state(), which checkpoint_meta() resets

    def sharded_state(self) -> dict[str, Any]:
        return {k: v for k, v in self.optimizer.sharded_state().items() if k.startswith("master/") and self.keep(k)}

    def checkpoint_meta(self) -> dict[str, Any]:
        return self.meta

    def load_checkpoint_meta(self, meta: dict[str, Any]) -> None:
        del meta  # the saved counters are not this load's to restore
        self.optimizer.load_checkpoint_meta(self.meta)  # our own counters back; the new weights into the model


def save_optimizer(optimizer: zero_optim.ShardedOptimizer, module: nn.Module, comm: zero_comm.Communicator,
                   save_dir: str | Path, tag: str, state: dict[str, Any], *, update_latest: bool = True) -> None:
    """Save ``module``'s ZeRO optimizer (every rank its shards), the module's buffers and untrained
    weights (:func:`module_extras`), and the engine's ``state`` as ``save_dir/tag``, replacing an
    existing ``tag`` atomically."""
    items: dict[str, Any] = {"optimizer": optimizer}
    with zero_optim.gathered(_frozen(module)):  # stage 3: frozen weights are partitioned too
        extras = module_extras(module, optimizer)
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        record = zero_ckpt.module_record(module, weights="optimizer/master/", extras="module/",
                                         frozen=[n for n, p in module.named_parameters() if id(p) not in trained])
        items["module"] = zero_ckpt.ModuleState(extras, _merged(comm, record))
        zero_ckpt.CheckpointManager(save_dir, comm).save(tag, items, client_state=state, overwrite=True,
                                                         update_latest=update_latest)


def _merged(comm: zero_comm.Communicator, record: zero_ckpt.ModuleRecord) -> zero_ckpt.ModuleRecord:
    """Every rank's module record as one (pipeline stages hold different layers; data-parallel ranks the
    same): rank 0 writes the record, so it must name every rank's keys. Collective."""
    if comm.world_size == 1:
        return record
    raw = msgspec.json.encode(record)
    size = comm.all_gather(torch.tensor([len(raw)], dtype=torch.int64)).tolist()
    buf = torch.zeros(max(size), dtype=torch.uint8)
    buf[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    rows = comm.all_gather(buf).view(comm.world_size, -1)
    records = [msgspec.json.decode(bytes(rows[r, :size[r]].tolist()), type=zero_ckpt.ModuleRecord)
               for r in range(comm.world_size)]
    merged = records[0]
    for theirs in records[1:]:
        merged = merged.merged(theirs)
    return merged


def load_optimizer(optimizer: zero_optim.ShardedOptimizer, module: nn.Module, comm: zero_comm.Communicator,
                   load_dir: str | Path, tag: str | None, *, strict: bool, weights_only: bool, restore_rng: bool,
                   whole_model: bool, counters: Collection[str] = ()) -> tuple[str, dict[str, Any]]:
    """Load the state of ``module``'s ZeRO optimizer (or, ``weights_only``, its master weights) and the
    module's extras from ``load_dir/tag``, all or nothing on every rank; returns the tag loaded and the
    engine's saved state, which must hold ``counters``. ``strict``: the checkpoint holds the weights
    this optimizer trains (and, for a ``whole_model`` on every rank, no others)."""
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    mine = {f"master/{n}" for n, p in module.named_parameters() if id(p) in trained}
    everyone = mine | {f"master/{n}" for n in zero_pipe.every_expert_name(module)}  # MoE: experts on other ranks
    found: dict[str, Any] = {}

    def check(reader: zero_ckpt.CheckpointReader, client: dict[str, Any]) -> None:
        where = f"checkpoint {reader.dir}"
        saved = {n.removeprefix("optimizer/") for n in reader.names if n.startswith("optimizer/master/")}
        missing, unexpected = sorted(mine - saved), sorted(saved - everyone) if whole_model else []
        if strict and (missing or unexpected):
            raise zero_ckpt.CheckpointError(
                f"load_checkpoint(load_module_strict=True): the {where} and the model differ in weights"
                f"{_named(' -- the checkpoint lacks', missing)}{_named(' -- the model lacks', unexpected)}; "
                "pass load_module_strict=False to load the ones they share")
        if missing and not weights_only:
            raise zero_ckpt.CheckpointError(
                f"load_checkpoint(load_module_strict=False): the {where} lacks weights of this model"
                f"{_named('', missing)}, so it has no optimizer state for them; pass load_optimizer_states=False "
                "to load the weights alone")
        ours, theirs = optimizer.checkpoint_meta(), client["items"].get("optimizer")
        if not isinstance(theirs, dict):
            raise zero_ckpt.CheckpointError(f"the {where} has no optimizer counters")
        if not weights_only and (theirs.get("rule", ours["rule"]) != ours["rule"]
                                 or len(theirs.get("hparams", ())) != len(ours["hparams"])):
            raise zero_ckpt.CheckpointError(
                f"the {where} holds the state of {theirs.get('rule')} with {len(theirs.get('hparams', ()))} "
                f"parameter groups; this optimizer runs {ours['rule']} with {len(ours['hparams'])}")
        state = client["client_state"]
        lacking = [k for k in ("client_state", *counters) if not isinstance(state, dict) or k not in state]
        if lacking:
            raise zero_ckpt.CheckpointError(f"the {where} lacks the engine's {', '.join(lacking)}")
        found.update(saved=saved, missing=missing, unexpected=unexpected, where=where)

    def items(reader: zero_ckpt.CheckpointReader) -> dict[str, Any]:
        saved = found["saved"]
        out: dict[str, Any] = {"optimizer": _MasterWeights(optimizer, lambda k: k in saved) if weights_only
                               else optimizer}
        held = sorted(extras.keys() & {n.removeprefix("module/") for n in reader.names if n.startswith("module/")})
        if held:
            out["module"] = zero_ckpt.tensors_state({k: extras[k] for k in held})
        found.update(held=held, lacks=sorted(extras.keys() - set(held)))
        return out

    manager = zero_ckpt.CheckpointManager(load_dir, comm)
    with zero_optim.gathered(_frozen(module)):  # read only: stage 3's frozen weights whole, to check and stage
        extras = module_extras(module, optimizer)
        prepared = manager.prepare(items, tag, restore_rng=restore_rng, check=check)
    if found["missing"] or found["unexpected"]:
        logger.warning(f"load_checkpoint: {len(found['missing'])} weights of the model are not in the "
                       f"{found['where']} (left as they are); {len(found['unexpected'])} of its weights are not "
                       "in the model")
    if found["lacks"]:
        logger.warning(f"load_checkpoint: the {found['where']} lacks {len(found['lacks'])} buffers or frozen "
                       f"weights of the model (left as they are): {', '.join(found['lacks'][:3])}")
    state = prepared.apply({"optimizer": prepared.items["optimizer"]})
    if found["held"]:
        # then the buffers and untrained weights; stage 3 partitions the latter: gathered, filled whole,
        # and every rank keeps its part
        with zero_optim.gathered(_frozen(module), modifier_rank=0):
            extras = module_extras(module, optimizer)
            prepared.apply({"module": zero_ckpt.tensors_state({k: extras[k] for k in found["held"]})},
                           restore_rng=False)
    return prepared.tag, state


def _frozen(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if not p.requires_grad]


def module_extras(module: nn.Module, optimizer: zero_optim.ShardedOptimizer) -> dict[str, Any]:
    """What a checkpoint needs besides the optimizer's state: the module's persistent buffers (a
    BatchNorm's running statistics) and the weights it does not train -- whole (at stage 3, call it
    where those are gathered), the same on every rank, under their ``state_dict`` names."""
    out: dict[str, Any] = {}
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    out.update({n: p for n, p in module.named_parameters() if id(p) not in trained})
    return out


def _named(lead: str, names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(n.removeprefix("master/") for n in names[:3])
    return f"{lead} {shown}{' ...' if len(names) > 3 else ''}"


def no_custom_load(custom_load_fn: Any) -> None:
    if custom_load_fn is not None:
        raise NotImplementedError("load_checkpoint(custom_load_fn=...) is not supported: zero loads the fp32 "
                                  "weight shards straight into the optimizer, with no module state dict to hand "
                                  "to a function; load with load_module_only=True and change the model after")


def nothing_to_resume(load_dir: str | Path, tag: str | None) -> bool:
    """No tag asked for and no ``latest`` file: DeepSpeed warns and loads nothing."""
    if tag is None and not (Path(load_dir) / "latest").is_file():
        logger.warning(f"load_checkpoint: no checkpoint in {load_dir} (no 'latest' file); nothing loaded. "
                       "Pass a tag to load a particular one.")
        return True
    return False
