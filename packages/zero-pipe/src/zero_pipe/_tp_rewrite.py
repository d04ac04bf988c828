"""Rewrite a GPT-style model's attention and MLP linears into tensor-parallel ones, in place.

The plan maps a pattern on a linear's qualified name to how it is split. Each
block's first linear (attention's QKV, the MLP's up projection) becomes a
:class:`ColumnParallelLinear` and its second (attention's output, the MLP's down
projection) a :class:`RowParallelLinear`, so a block costs one all-reduce forward
and one backward. Attention modules (those with an ``n_head`` attribute) have
``n_head`` divided by the degree: each rank runs its own heads, which requires the
attention's forward to take the head size from its QKV output, not from the
model width. The default plan covers the usual names (nanoGPT's ``c_attn``,
``c_proj``, ``c_fc``; ``qkv``/``proj``; ``nn.Sequential`` MLPs as ``mlp.0``/``mlp.2``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from zero_comm import Communicator

from ._tp_layers import ColumnParallelLinear, RowParallelLinear

__all__ = ["GPT_PLAN", "tensor_parallelize"]

GPT_PLAN: dict[str, str] = {
    r"attn\.(qkv|c_attn)$": "column_qkv",
    r"attn\.(proj|c_proj|out_proj|o_proj)$": "row",
    r"mlp\.(0|fc|c_fc|up_proj|fc1)$": "column",
    r"mlp\.(2|proj|c_proj|down_proj|fc2)$": "row",
}
_STYLES = ("column", "column_qkv", "row")


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
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        chosen = next((s for p, s in compiled if p.search(name)), None)
        if chosen is None:
            continue
        if chosen == "row":
            new: nn.Module = RowParallelLinear.from_linear(module, comm)
        else:
            new = ColumnParallelLinear.from_linear(module, comm, blocks=3 if chosen == "column_qkv" else 1)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        done.append(name)
    if not done:
        raise ValueError("the tensor-parallel plan matched no nn.Linear of the model; linears are named "
                         f"{[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]}")
    for name, module in model.named_modules():
        heads = getattr(module, "n_head", None)
        if isinstance(heads, int) and any(d.startswith(f"{name}.") or not name for d in done):
            if heads % comm.world_size:
                raise ValueError(f"{name or 'the model'} has {heads} attention heads, not divisible by the "
                                 f"tensor-parallel degree {comm.world_size}")
            module.n_head = heads // comm.world_size
    return done
