"""``deepspeed.runtime``: ``lr_schedules``, ``engine`` (``DeepSpeedEngine``) and ``zero``, by DeepSpeed's paths."""

from . import engine, lr_schedules, zero

__all__ = ["engine", "lr_schedules", "zero"]
