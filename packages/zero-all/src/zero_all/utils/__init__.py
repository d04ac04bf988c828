"""``deepspeed.utils``: the ``logger`` zero writes to, ``log_dist`` (a log line from chosen ranks) and
``zero_to_fp32`` (a checkpoint as one fp32 ``state_dict``: ``deepspeed.utils.zero_to_fp32``)."""

from __future__ import annotations

import logging

import torch.distributed as dist

__all__ = ["log_dist", "logger", "zero_to_fp32"]

from . import zero_to_fp32

logger = logging.getLogger("zero_all")


def log_dist(message: str, ranks: list[int] | None = None, level: int = logging.INFO) -> None:
    """Log ``"[Rank r] message"`` on the ranks in ``ranks`` (``[-1]``: every rank). As in DeepSpeed,
    ``ranks=None`` logs only while torch.distributed is not initialised (a single process)."""
    if not dist.is_initialized():
        logger.log(level, f"[Rank -1] {message}")
        return
    rank = dist.get_rank()
    if ranks and (ranks[0] == -1 or rank in ranks):
        logger.log(level, f"[Rank {rank}] {message}")
