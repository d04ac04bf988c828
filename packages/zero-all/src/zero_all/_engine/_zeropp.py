"""ZeRO++ from the config: ``zero_quantized_weights`` (qwZ), ``zero_quantized_gradients`` (qgZ) and
``zero_hpz_partition_size`` (hpZ) become zero-optim's stage-3 options, and hpZ's group of consecutive ranks
is made here (every rank must build it, in step). Each is checked with the key's name: ZeRO++ is a stage-3
feature, and a partition size must divide the data-parallel world."""

from __future__ import annotations

from typing import Any

import zero_comm

from .._config import ConfigError

__all__ = ["hpz_group", "zeropp_options"]

KEYS = {"zero_quantized_weights": "quantized_weights", "zero_quantized_gradients": "quantized_gradients",
        "zero_hpz_partition_size": "hpz_partition_size"}


def zeropp_options(zero: Any, world_size: int) -> dict[str, Any]:
    """``ZeroConfig`` keyword arguments for the config's ZeRO++ keys (none when they are off)."""
    given = {key: getattr(zero, key) for key in KEYS}
    used = [k for k, v in given.items() if (v > 1 if k == "zero_hpz_partition_size" else v)]
    if not used:
        return {}
    if zero.stage != 3:
        raise ConfigError(f"zero_optimization.{used[0]}: ZeRO++ works with stage 3 (it changes how partitioned "
                          "parameters are gathered and gradients reduce-scattered); this config has stage "
                          f"{zero.stage}")
    k = given["zero_hpz_partition_size"]
    if k < 1 or world_size % k:
        raise ConfigError(f"zero_optimization.zero_hpz_partition_size: {k} must divide the data-parallel world size "
                          f"{world_size} (ranks per node, e.g. 8)")
    offload = zero.offload_param
    if k > 1 and offload is not None and offload.device != "none":
        raise ConfigError("zero_optimization.zero_hpz_partition_size: hpZ keeps a second parameter shard on the "
                          f"device, which parameter offload (offload_param.device {offload.device!r}) moves away; "
                          "use one or the other")
    return {KEYS[key]: value for key, value in given.items()}


def hpz_group(zero: Any, comm: zero_comm.Communicator) -> zero_comm.Communicator | None:
    """This rank's hpZ group (consecutive ranks), or None without hpZ; booked in ``comm``'s ledger by group."""
    k = zero.zero_hpz_partition_size
    if k <= 1 or zero.stage != 3:
        return None
    return zero_comm.build_partition_group(k, ledger=comm.ledger)
