"""``deepspeed.moe``: the mixture-of-experts layer (:class:`layer.MoE`) and ``utils.is_moe_param``."""

from . import layer, utils
from .layer import MoE

__all__ = ["MoE", "layer", "utils"]
