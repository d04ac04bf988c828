"""``deepspeed.runtime.lr_schedules``: DeepSpeed's LR schedules by their DeepSpeed import path, and
``VALID_LR_SCHEDULES`` (their names: what Accelerate checks a scheduler's class name against)."""

from .._engine import SCHEDULES, LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR

VALID_LR_SCHEDULES = list(SCHEDULES)

__all__ = ["VALID_LR_SCHEDULES", "LRRangeTest", "OneCycle", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR"]
