"""``deepspeed.runtime.engine``: ``DeepSpeedEngine`` by its DeepSpeed import path (zero's :class:`~zero_all.Engine`)."""

from .._engine import DeepSpeedEngine

__all__ = ["DeepSpeedEngine"]
