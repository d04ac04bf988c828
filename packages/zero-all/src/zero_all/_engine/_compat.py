"""DeepSpeed's process-level helpers: ``init_distributed`` and ``add_config_arguments``.

``init_distributed`` keeps DeepSpeed's signature and maps it onto
:func:`zero_comm.init_distributed`, which already reads torchrun's, SLURM's and
OpenMPI's variables (DeepSpeed's MPI discovery) and is idempotent. What DeepSpeed's
arguments change is handed over as the launch environment zero-comm reads:
``rank``/``world_size`` and a ``tcp://host:port`` ``init_method`` become
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

import torch.distributed as dist

import zero_comm

__all__ = ["add_config_arguments", "init_distributed"]

DEFAULT_PORT = 29500


def init_distributed(dist_backend: str | None = None, auto_mpi_discovery: bool = True,
                     distributed_port: int = DEFAULT_PORT, verbose: bool = True,
                     timeout: timedelta | float | None = None, init_method: str | None = None,
                     dist_init_required: bool | None = None, config: Any = None, rank: int = -1,
                     world_size: int = -1) -> zero_comm.ProcessGroupCommunicator:
    """Join the job's process group (DeepSpeed's ``deepspeed.init_distributed``); returns the world
    communicator (DeepSpeed returns nothing; the return value is zero's addition).

    ``dist_backend`` defaults to NCCL with CUDA, Gloo without. ``auto_mpi_discovery=False``
    ignores OpenMPI's variables. ``distributed_port`` is the rendezvous port when
    ``MASTER_PORT`` is not set. ``timeout`` bounds every collective (default: zero-comm's,
    ``ZERO_COMM_TIMEOUT`` or 300 s). ``init_method`` may be ``env://`` or
    ``tcp://host:port``. ``dist_init_required=False`` asserts the process group already
    exists. ``verbose`` and ``config`` (DeepSpeed's comms-logger settings) change nothing:
    zero-comm's ledger books every collective.
    """
    del verbose, config
    if dist_init_required is False:
        if not dist.is_initialized():
            raise RuntimeError("init_distributed(dist_init_required=False): torch.distributed is not initialised; "
                               "pass dist_init_required=True (or None) to initialise it")
        return zero_comm.init_distributed(dist_backend)
    if dist.is_initialized():
        return zero_comm.init_distributed(dist_backend)
    env = dict(os.environ)
    if not auto_mpi_discovery:
        env = {k: v for k, v in env.items() if not k.startswith("OMPI_COMM_WORLD_")}
    env.setdefault("MASTER_PORT", str(distributed_port))
    if init_method is not None and init_method != "env://":
        url = urlparse(init_method)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise ValueError(f"init_distributed(init_method={init_method!r}): zero joins through 'env://' or "
                             "'tcp://host:port'")
        env["MASTER_ADDR"], env["MASTER_PORT"] = url.hostname, str(url.port)
    if (rank >= 0) != (world_size >= 1):
        raise ValueError(f"init_distributed: pass rank and world_size together (got rank={rank}, "
                         f"world_size={world_size})")
    if rank >= 0:
        env["RANK"], env["WORLD_SIZE"] = str(rank), str(world_size)
        env.setdefault("LOCAL_RANK", str(rank))
    return zero_comm.init_distributed(dist_backend, timeout=timeout, env=env)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's command-line flags to ``parser``: ``--deepspeed``, ``--deepspeed_config``
    (read by ``initialize(args=args)``) and their deprecated ``--deepscale`` spellings."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="enable DeepSpeed (a flag for the user's script; the engine does not read it)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="the ds_config.json file")
    group.add_argument("--deepscale", default=False, action="store_true", help="deprecated: --deepspeed")
    group.add_argument("--deepscale_config", default=None, type=str, help="deprecated: --deepspeed_config")
    return parser
