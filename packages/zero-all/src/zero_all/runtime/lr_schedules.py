"""``deepspeed.runtime.lr_schedules``: DeepSpeed's LR schedules by their DeepSpeed import path."""

from .._lr import LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR

__all__ = ["LRRangeTest", "OneCycle", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR"]
