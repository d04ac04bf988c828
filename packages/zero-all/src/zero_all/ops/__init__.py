"""``deepspeed.ops``: the optimizers DeepSpeed ships as ops (``adam``, ``adagrad``, ``lion``)."""

from . import adagrad, adam, lion

__all__ = ["adagrad", "adam", "lion"]
