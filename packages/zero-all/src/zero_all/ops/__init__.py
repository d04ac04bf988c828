"""``deepspeed.ops``: the optimizers DeepSpeed ships as ops (``deepspeed.ops.adam``)."""

from . import adam

__all__ = ["adam"]
