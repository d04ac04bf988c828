"""Rewrite a GPT-style model's attention and MLP linears into tensor-parallel ones, in place.

The plan maps a pattern on a linear's qualified name to how it is split. Each
block's first linears (attention's QKV, the MLP's up and gate projections) become
:class:`ColumnParallelLinear` and its last (attention's output, the MLP's down
projection) a :class:`RowParallelLinear`, so an attention and an MLP each cost one
all-reduce forward (as in Megatron-LM). Each rank runs its own heads: the attention's
forward must take the head count from its QKV output (a reshape by head size, as
nanoGPT-style models and Hugging Face's GPT-2 and Llama do). Head-count attributes
an attention keeps (``n_head``, ``num_heads``, ``num_key_value_heads``, GPT-2's
``split_size``) are divided by the degree.

The default plan covers the usual names: nanoGPT's and GPT-2's ``c_attn``,
``c_proj``, ``c_fc``; ``qkv``/``proj``; Llama's ``q_proj``/``k_proj``/``v_proj``/
``o_proj`` and ``gate_proj``/``up_proj``/``down_proj``; ``nn.Sequential`` MLPs as
``mlp.0``/``mlp.2``. Hugging Face's ``Conv1D`` (a linear whose weight is stored
transposed) is rewritten like a linear.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from zero_comm import Communicator

from ._tp_layers import ColumnParallelLinear, RowParallelLinear

__all__ = ["GPT_PLAN", "tensor_parallelize"]

GPT_PLAN: dict[str, str] = {
    r"attn\.(qkv|c_attn)$": "column_qkv",
    r"attn\.(q_proj|k_proj|v_proj)$": "column",
    r"attn\.(proj|c_proj|out_proj|o_proj)$": "row",
    r"mlp\.(0|fc|c_fc|up_proj|gate_proj|fc1)$": "column",
    r"mlp\.(2|proj|c_proj|down_proj|fc2)$": "row",
}
_STYLES = ("column", "column_qkv", "row")
# attributes an attention module may keep that count its heads (or, GPT-2's split_size, their width)
HEAD_ATTRS = ("n_head", "num_heads", "num_key_value_heads", "split_size")


def _as_linear(module: nn.Module) -> nn.Linear | None:
    """``module`` as an ``nn.Linear`` (itself, or a copy of a Hugging Face ``Conv1D``), else None."""
    if isinstance(module, nn.Linear):
        return module
    weight = getattr(module, "weight", None)
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    if (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and isinstance(nf, int)
            and isinstance(nx, int) and weight.shape == (nx, nf)):
        bias = getattr(module, "bias", None)
        linear = nn.Linear(nx, nf, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
        return linear
    return None


def _check_heads(owner_name: str, owner: nn.Module, linear: nn.Linear, blocks: int, degree: int) -> None:
    """A column split of an attention projection must fall on head boundaries."""
    head_dim = getattr(owner, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        return
    heads = linear.out_features // blocks // head_dim
    if heads * head_dim * blocks == linear.out_features and heads % degree:
        raise ValueError(f"{owner_name or 'the model'} has {heads} attention heads in this projection (of "
                         f"{head_dim} features each), not divisible by the tensor-parallel degree {degree}")


def tensor_parallelize(model: nn.Module, comm: Communicator, plan: Mapping[str, str] | None = None) -> list[str]:
    """Replace the linears of ``model`` that ``plan`` names by tensor-parallel ones; return their names.

    Every rank must call this on an identical model; each keeps its slice of the
    weights, so the result computes exactly what the model did.
    """
    plan = GPT_PLAN if plan is None else plan
    for pattern, style in plan.items():
        if style not in _STYLES:
            raise ValueError(f"plan entry {pattern!r} has style {style!r}; expected one of {', '.join(_STYLES)}")
    compiled = [(re.compile(p), s) for p, s in plan.items()]
    chosen: list[tuple[str, str, nn.Linear]] = []
    for name, module in list(model.named_modules()):
        found = next((s for p, s in compiled if p.search(name)), None)
        linear = _as_linear(module) if found is not None else None
        if linear is None or found is None:
            continue
        parent_name = name.rpartition(".")[0]
        if found != "row":
            _check_heads(parent_name, model.get_submodule(parent_name), linear, 3 if found == "column_qkv" else 1,
                         comm.world_size)
        chosen.append((name, found, linear))
    if not chosen:
        raise ValueError("the tensor-parallel plan matched no linear of the model; linears are named "
                         f"{[n for n, m in model.named_modules() if _as_linear(m) is not None][:8]}")
    # the modules above a rewritten linear (its attention, block, the model) may count heads
    owners = {".".join(name.split(".")[:depth]) for name, _, _ in chosen for depth in range(name.count(".") + 1)}
    for name, module in model.named_modules():  # check every head count before changing anything
        if name not in owners:
            continue
        for attr in HEAD_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value % comm.world_size:
                raise ValueError(f"{name or 'the model'}.{attr} is {value}, not divisible by the tensor-parallel "
                                 f"degree {comm.world_size}")
    done: list[str] = []
    for name, style, linear in chosen:
        if style == "row":
            new: nn.Module = RowParallelLinear.from_linear(linear, comm)
        else:
            new = ColumnParallelLinear.from_linear(linear, comm, blocks=3 if style == "column_qkv" else 1)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new.to(linear.weight.device, linear.weight.dtype))
        done.append(name)
    for name, module in model.named_modules():
        if name in owners:
            for attr in HEAD_ATTRS:
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(module, attr, value // comm.world_size)
    return done
