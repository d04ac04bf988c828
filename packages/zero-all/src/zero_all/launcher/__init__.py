"""``deepspeed.launcher``: ``runner``'s names that launchers built on DeepSpeed read (Accelerate's
``accelerate launch --use_deepspeed``). zero's launcher is ``zero run`` (:mod:`zero_all._cli`)."""

from . import runner

__all__ = ["runner"]
