"""``deepspeed.moe.utils``: ``is_moe_param`` and ``split_params_into_different_moe_groups_for_optimizer``."""

from __future__ import annotations

from typing import Any

import torch

from zero_pipe import is_expert_param

__all__ = ["is_moe_param", "split_params_into_different_moe_groups_for_optimizer"]


def is_moe_param(param: torch.Tensor) -> bool:
    """Whether ``param`` belongs to an expert (reduced over its expert-data-parallel group)."""
    return is_expert_param(param)


def split_params_into_different_moe_groups_for_optimizer(param_groups: Any, max_group_size: Any = None) -> Any:
    """The groups unchanged: zero's ZeRO optimizer keeps each group's experts apart itself (same
    hyper-parameters, reduced over their own ranks), so a DeepSpeed script that calls this still runs."""
    del max_group_size
    return param_groups
