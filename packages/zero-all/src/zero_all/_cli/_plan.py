"""``zero plan``: how many bytes each rank holds, per ZeRO stage and offload choice, before running.

The figures are derived from what zero-optim allocates, not from the ZeRO paper's
``(2 + 2 + K) * params / N``: the flat buffers stages 0-2 lay out (every bucket padded
to ``world_size * align``, via zero-optim's own :func:`zero_optim.build_layout`), the
fp32 master copy (none for an fp32 model on the device: its weights, or its stage-3 shard,
are the masters; an offload store keeps its own copy), the rule's state tensors, the stage-2 staging
ring (at most three bucket buffers: one filling, two reducing), stage 3's gather
units (cut by ``zero_optim.unit_parameters``; the parameters of at most ``persistence_threshold``
elements in one unit kept whole) with their prefetch window (``prefetch_numel`` ahead,
capped by ``max_live_numel``), and the transient buffers of a step: a parameter's
gradient before the hook moves it, stage 1's reduced chunks (two buckets' in flight), and on Gloo (CPU) the
full-size scratch its ``all_gather`` allocates (NCCL gathers in place).

Not included: activations (they depend on the batch, the sequence and activation
checkpointing), the framework's own context (CUDA context, NCCL buffers), allocator
fragmentation.

Stage 3's parameter offload (``offload_param``, ZeRO-Infinity) keeps each gather unit's
parameter and gradient shards in the optimizer's store as well: the device keeps the
persistent unit (whole, and its shard and gradient shard) and the gathered working set;
the store (host memory or NVMe) holds the fp32 masters, the rule's state, and every
other unit's parameter and gradient shard. zero has one store, so parameters go where
the optimizer state goes.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

import zero_optim

__all__ = ["MemoryPlan", "ModelShape", "Offload", "model_shape", "plan_memory", "synthetic_shape"]

Offload = Literal["none", "cpu", "nvme"]
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# fp32 state tensors per parameter, as each of zero_optim's rules keeps them (SGD: its momentum buffer)
STATE_TENSORS = {name: len(rule().state_names) for name, rule in (
    ("adamw", zero_optim.AdamW), ("adam", zero_optim.Adam), ("lamb", zero_optim.LAMB), ("lion", zero_optim.Lion),
    ("sgd", zero_optim.SGD))}
STAGING_RING = 3  # stage 2/3 gradient buffers alive at once: one filling, two reducing (zero-optim's drain(keep=1))
GLOO_GATHERS = 3  # Gloo all_gathers whose scratch buffers were seen alive at once


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model: its trainable parameters' sizes, in registration
    order, and how stage 3 groups them into gather units (``zero_optim.unit_parameters``)."""

    params: tuple[int, ...]
    modules: tuple[tuple[int, ...], ...]  # per gather unit head: the sizes of the parameters it gathers
    name: str = "model"

    @property
    def numel(self) -> int:
        return sum(self.params)


def model_shape(module: nn.Module, name: str = "model", unit_numel: int = zero_optim.ZeroConfig.unit_numel,
                granularity_threshold: int = 0) -> ModelShape:
    """The shape of ``module`` (build it on the meta device: nothing is allocated), its stage-3 units
    cut as zero-optim cuts them with ``unit_numel`` and ``granularity_threshold``."""
    modules = []
    for named in zero_optim.unit_parameters(module, unit_numel, granularity_threshold):
        own = tuple(p.numel() for _, p in named if p.requires_grad)
        if own:
            modules.append(own)
    params = tuple(p.numel() for p in module.parameters() if p.requires_grad)
    return ModelShape(params, tuple(modules), name)


def synthetic_shape(numel: int, layers: int) -> ModelShape:
    """A model known only by its size: ``layers`` equal blocks of one weight each."""
    if numel < 1 or layers < 1:
        raise ValueError(f"--params and --layers must be positive, got {numel} and {layers}")
    base, extra = divmod(numel, layers)
    sizes = tuple(base + (1 if i < extra else 0) for i in range(layers))
    return ModelShape(sizes, tuple((s,) for s in sizes), f"{numel:,} parameters in {layers} blocks")


def parse_model_args(items: Sequence[str]) -> dict[str, object]:
    """``--model-arg`` values: ``KEY=VALUE`` (VALUE read as JSON, else kept as a string) or one JSON object."""
    import json

    out: dict[str, object] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                given = json.loads(item)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--model-arg {item!r}: not a JSON object ({exc})") from None
            if not isinstance(given, dict):
                raise ValueError(f"--model-arg {item!r}: not a JSON object")
            out.update(given)
            continue
        key, eq, text = item.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(f"--model-arg wants KEY=VALUE or a JSON object, got {item!r}")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def _call_factory(factory: object, kwargs: dict[str, object]) -> object:
    """``factory(**kwargs)``; when the factory takes one config object instead (``GPT(cfg: GPTConfig)``),
    ``factory(Config(**kwargs))`` with the class its annotation names."""
    import dataclasses
    import inspect
    import typing

    assert callable(factory)
    try:
        params = [p for p in inspect.signature(factory).parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) == 1 and params[0].name not in kwargs:
        target = factory.__init__ if isinstance(factory, type) else factory  # type: ignore[misc]
        try:
            hint = typing.get_type_hints(target).get(params[0].name)
        except Exception:
            hint = None
        if isinstance(hint, type) and (dataclasses.is_dataclass(hint) or hasattr(hint, "__init__")) \
                and hint.__module__ != "builtins":
            return factory(hint(**kwargs))
    return factory(**kwargs)


def load_model(spec: str, kwargs: dict[str, object] | None = None, *, meta: bool = True) -> nn.Module:
    """``module:factory`` -> the model ``factory(**kwargs)`` builds, on the meta device (``meta=False``:
    for real, on the default device). The current directory is on ``sys.path`` first, as for ``python -m``."""
    import os
    import sys

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model wants module:factory (e.g. mypkg.models:build), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ValueError(f"--model {spec}: no module named {exc.name!r} (from {os.getcwd()})") from None
        raise ValueError(f"--model {spec}: importing {module_name} failed: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"--model {spec}: module {module_name!r} has no attribute {attr!r}")
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = _call_factory(factory, kwargs or {})
    except Exception as exc:
        if os.environ.get("ZERO_TRACEBACK", "") not in ("", "0"):
            raise
        raise ValueError(f"--model {spec}: {attr}({', '.join(f'{k}={v!r}' for k, v in (kwargs or {}).items())}) "
                         f"failed: {type(exc).__name__}: {exc} (--model-arg KEY=VALUE passes arguments; "
                         "ZERO_TRACEBACK=1 shows the traceback)") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec}: {attr}() returned a {type(model).__name__}, not an nn.Module")
    return model


@dataclass
class MemoryPlan:
    """Bytes per rank for one stage and offload choice; ``device`` and ``host`` rows by component."""

    stage: int
    offload: Offload
    offload_param: Offload = "none"
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    disk: int = 0

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """The settings that change the figures (zero_optim.ZeroConfig's, with its defaults)."""

    world_size: int
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    optimizer: str = "adamw"
    bucket_numel: int = 1 << 24
    align: int = 64
    prefetch_numel: int = 50_000_000
    max_live_numel: int = 1_000_000_000
    persistence_threshold: int = 100_000
    backend: Literal["gloo", "nccl"] = "nccl"
    nvme_buffer_bytes: int = 1 << 30


class _Meta:
    """A stand-in parameter for build_layout, which only asks for numel() and id()."""

    def __init__(self, n: int):
        self.n = n

    def numel(self) -> int:
        return self.n


def _gathered_window(units: Sequence[int], prefetch: int, max_live: int) -> int:
    """The most elements of gathered units at once: the unit in use plus ZeroStage3's prefetch, which
    gathers the next units in the recorded order while its budget lasts and ``max_live`` allows."""
    peak = 0
    for order in (units, units[::-1]):  # forward, then backward (reverse order)
        for i, unit in enumerate(order):
            live, budget = unit, prefetch
            for nxt in order[i + 1:]:
                if budget <= 0 or live + nxt > max_live:
                    break
                live += nxt
                budget -= nxt
            peak = max(peak, live)
    return peak


def _stages012(shape: ModelShape, stage: int, o: PlanOptions, b: int,
               states: int) -> tuple[dict[str, int], int, int]:
    """(resident bytes by component, transient peak bytes, this rank's shard elements) for ZeroOptimizer."""
    shard_world = 1 if stage == 0 else o.world_size
    layout = zero_optim.build_layout([_Meta(n) for n in shape.params],  # type: ignore[misc]
                                     shard_world, o.bucket_numel, o.align)
    padded = sorted((bk.padded for bk in layout.buckets), reverse=True)
    resident = {"parameters": layout.total * b,
                "master weights (fp32)": 0 if b == 4 else layout.shard_numel * 4,  # fp32: weights are masters
                "optimizer state": states * layout.shard_numel * 4}
    if stage < 2:
        resident["gradients"] = layout.total * b
    else:
        resident["gradients"] = layout.shard_numel * b
        resident["gradient buckets"] = sum(padded[:STAGING_RING]) * b
    param_grad = max(shape.params) * b  # autograd's .grad of one parameter, before the hook moves it
    chunks = sorted((bk.chunk for bk in layout.buckets), reverse=True)
    backward = param_grad + (sum(chunks[:2]) * b if stage == 1 else 0)  # stage 1: reduced chunks in flight
    # Gloo's all_gather runs through a full-size scratch buffer; the step's async gathers overlap (up
    # to three were seen alive at once); NCCL gathers in place
    gather_scratch = sum(padded[:GLOO_GATHERS]) * b if (o.backend == "gloo" and stage >= 1) else 0
    upcast = max(bk.chunk for bk in layout.buckets) * 4 if b != 4 else 0  # the rule's fp32 copy of a chunk
    return resident, max(backward, gather_scratch + upcast), layout.shard_numel


def _stage3(shape: ModelShape, o: PlanOptions, b: int, states: int,
            offload_param: bool) -> tuple[dict[str, int], int, int, int]:
    """(resident device bytes by component, transient peak bytes, this rank's shard elements, bytes of
    parameter and gradient shards moved to the store) for ZeroStage3."""
    w = o.world_size
    gloo = o.backend == "gloo"
    units, small = [], 0
    for own in shape.modules:
        big = [n for n in own if n > o.persistence_threshold]
        small += sum(own) - sum(big)
        if big:
            units.append(math.ceil(sum(big) / w) * w)
    persistent = math.ceil(small / w) * w if small else 0
    shard = (sum(units) + persistent) // w
    # offload_param moves every unit's parameter and gradient shard to the store but the persistent one's
    kept = persistent // w if offload_param else shard
    resident = {"parameters": kept * b + persistent * b,  # shards, and the small parameters kept whole
                "gradients": kept * b,
                "master weights (fp32)": 0 if b == 4 else shard * 4,  # an fp32 shard is its own master
                "optimizer state": states * shard * 4}
    largest = max(units, default=0)
    window = _gathered_window(units, o.prefetch_numel, max(o.max_live_numel, largest))
    gathered = window * b
    if offload_param and not gloo:  # each gather in flight reads its shard from the store into a device copy
        gathered += window // w * b
    staging = sum(sorted(units, reverse=True)[:STAGING_RING]) * b
    param_grad = max(shape.params) * b
    gather_scratch = sum(sorted(units, reverse=True)[:GLOO_GATHERS]) * b if gloo else 0
    # in backward a prefetch gather's Gloo scratch overlaps the gradient staging: one, typically (more when
    # Gloo's threads lag behind: the measured peak moves by a unit or two from run to run)
    backward = staging + param_grad + (largest * b if gloo else 0)
    if offload_param:  # the two reduce-scatters in flight each write a shard-size buffer, added to the store's
        backward += 2 * (largest // w) * b
    resident["gathered parameters"] = gathered
    upcast = largest // w * 4 if b != 4 else 0
    return resident, max(backward, gather_scratch, upcast), shard, 2 * (shard - kept) * b


def plan_memory(shape: ModelShape, stage: int, offload: Offload, options: PlanOptions,
                offload_param: Offload = "none") -> MemoryPlan:
    """Peak bytes one rank holds for ``shape`` trained at ``stage`` with the optimizer state on
    ``offload`` and, in stage 3, the parameter and gradient shards on ``offload_param``."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
    if offload_param != "none" and stage != 3:
        raise ValueError(f"--offload-param offloads stage 3's partitioned parameters: it needs stage 3, "
                         f"got stage {stage}")
    if offload_param not in ("none", offload):
        raise ValueError(f"--offload-param {offload_param} needs --offload {offload_param}: zero keeps offloaded "
                         f"parameter shards in the optimizer's store, got --offload {offload}")
    if options.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {options.world_size}")
    if options.optimizer not in STATE_TENSORS:
        raise ValueError(f"--optimizer must be one of {', '.join(STATE_TENSORS)}, got {options.optimizer!r}")
    b = BYTES[options.precision]
    states = STATE_TENSORS[options.optimizer]
    shard = moved_shards = 0
    if stage == 3:
        resident, transient, shard, moved_shards = _stage3(shape, options, b, states, offload_param != "none")
    else:
        resident, transient, shard = _stages012(shape, stage, options, b, states)
    plan = MemoryPlan(stage, offload, offload_param)
    moved = ("master weights (fp32)", "optimizer state")
    if offload == "none":
        plan.device = dict(resident)
    else:
        plan.device = {k: v for k, v in resident.items() if k not in moved}
        # the store's fp32 masters are a copy of the shard, even for an fp32 model, and the rule's state
        optimizer_bytes = shard * 4 * (1 + states)
        # the step copies each group's gradient shard and its new weights to where the state is
        step_copies = 2 * resident["gradients"] if stage >= 2 else 2 * shard * b
        if offload == "cpu":
            plan.host = {"master weights + optimizer state": optimizer_bytes}
            if moved_shards:
                plan.host["parameter + gradient shards"] = moved_shards
            plan.host["step copies"] = step_copies
        else:
            plan.host = {"NVMe read/write buffers": options.nvme_buffer_bytes, "step copies": step_copies}
            plan.disk = optimizer_bytes + moved_shards
    plan.device["transient (step working set)"] = transient
    return plan


def plan_all(shape: ModelShape, stages: Iterable[int], offloads: Iterable[Offload],
             options: PlanOptions, offload_param: Offload = "none") -> list[MemoryPlan]:
    return [plan_memory(shape, s, off, options, offload_param) for s in stages for off in offloads]


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def format_plans(plans: list[MemoryPlan], shape: ModelShape, options: PlanOptions, ranks_per_node: int) -> str:
    """The table ``zero plan`` prints: one column per stage/offload choice."""
    heads = [f"stage {p.stage}" + ("" if p.offload == "none" else f" +{p.offload}")
             + ("" if p.offload_param == "none" else " +params") for p in plans]
    rows: list[tuple[str, list[str]]] = []
    order = ["parameters", "gradients", "master weights (fp32)", "optimizer state", "gradient buckets",
             "gathered parameters", "transient (step working set)"]
    device_keys = [k for k in order if any(k in p.device for p in plans)]
    for key in device_keys:
        rows.append((f"  {key}", [human(p.device[key]) if key in p.device else "-" for p in plans]))
    rows.append(("device total per rank", [human(p.device_total) for p in plans]))
    host_keys = list(dict.fromkeys(k for p in plans for k in p.host))
    for key in host_keys:
        rows.append((f"  host: {key}", [human(p.host[key]) if key in p.host else "-" for p in plans]))
    rows.append(("host total per rank", [human(p.host_total) for p in plans]))
    rows.append((f"host total per node ({ranks_per_node} ranks)",
                 [human(p.host_total * ranks_per_node) for p in plans]))
    if any(p.disk for p in plans):
        rows.append(("NVMe per rank", [human(p.disk) if p.disk else "-" for p in plans]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(h), *(len(r[1][i]) for r in rows)) for i, h in enumerate(heads)]
    lines = [f"{shape.name}: {shape.numel:,} trainable parameters; world size {options.world_size}, "
             f"{options.precision}, {options.optimizer}, {options.backend}",
             " " * width + "  " + "  ".join(h.rjust(c) for h, c in zip(heads, cols, strict=True))]
    for label, cells in rows:
        lines.append(label.ljust(width) + "  " + "  ".join(c.rjust(n) for c, n in zip(cells, cols, strict=True)))
    lines.append("Activations are not included: they depend on batch, sequence length and activation "
                 "checkpointing.")
    return "\n".join(lines)
