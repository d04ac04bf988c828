"""A checkpoint as one plain ``state_dict``, without a process group.

:func:`consolidate` builds whole tensors from a :class:`CheckpointReader`, whatever
world size wrote the checkpoint; :func:`export` writes them to one file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import torch

from ._format import CheckpointError
from ._reader import CheckpointReader

__all__ = ["consolidate", "export"]


def consolidate(root: str | os.PathLike, tag: str | None = None, *, prefix: str = "optim/master/",
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with ``prefix``, whole, named without the prefix; no process
    group needed, whatever world size wrote the checkpoint."""
    reader = CheckpointReader(root, tag)
    names = [n for n in reader.names if n.startswith(prefix)]
    if not names:
        raise CheckpointError(f"checkpoint {reader.dir} has no tensors under {prefix!r} "
                              f"(it has e.g. {reader.names[:3]})")
    return {n[len(prefix):]: reader.full(n, dtype) for n in names}


def export(root: str | os.PathLike, out: str | os.PathLike, tag: str | None = None, *,
           prefix: str = "optim/master/", dtype: torch.dtype = torch.float32) -> Path:
    """Write one ``state_dict`` file that plain ``torch.load`` reads (fp32 by default, or bf16): the
    consolidated ``prefix`` tensors of the checkpoint. Written atomically."""
    state = consolidate(root, tag, prefix=prefix, dtype=dtype)
    out = Path(out)
    tmp = out.with_name(out.name + f".partial-{secrets.token_hex(4)}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out
