"""How a message between stages is laid out: a 16-integer header, then the tensor's bytes.

The header says what the message is (activation, gradient, tied values, abort), its
micro-batch or index, the virtual stage it is for, and the tensor's dtype and shape.
A message is sent *split* (header, then payload, as two transfers) when the
receiver cannot know its size, or *packed* (one buffer: header bytes then payload
bytes) when it can -- every later message of a kind whose shape the first one fixed.
The header is 128 bytes so a payload of any dtype starts aligned in a packed buffer.
"""

from __future__ import annotations

import torch

from ._errors import PipelineError

__all__ = ["HEADER_INTS", "KINDS", "MAX_DIMS", "MessageKey", "check_sendable", "decode", "encode", "pack",
           "packed_bytes", "unpack"]

MessageKey = tuple[str, int, int]  # (kind, micro_batch or index, virtual stage or rank)

KINDS = ("act", "grad", "tied", "tied_init", "abort")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
MAX_DIMS = 8
HEADER_INTS = 16  # kind, index, target, dtype, ndim, up to 8 dims, padding
_HEADER_BYTES = HEADER_INTS * 8


def encode(key: MessageKey, dtype: torch.dtype = torch.uint8, shape: tuple[int, ...] = ()) -> torch.Tensor:
    header = torch.zeros(HEADER_INTS, dtype=torch.int64)
    header[:5] = torch.tensor([KINDS.index(key[0]), key[1], key[2], DTYPES.index(dtype), len(shape)])
    header[5:5 + len(shape)] = torch.tensor(list(shape), dtype=torch.int64)
    return header


def decode(header: torch.Tensor, rank: int, src: int) -> tuple[MessageKey, torch.dtype, torch.Size]:
    kind, index, target, dtype, ndim = (int(v) for v in header[:5])
    if not 0 <= kind < len(KINDS) or not 0 <= dtype < len(DTYPES) or not 0 <= ndim <= MAX_DIMS:
        raise PipelineError(f"stage {rank} received a malformed header from stage {src}: {header.tolist()} "
                            "(do all stages run the same zero-pipe version and schedule?)")
    return (KINDS[kind], index, target), DTYPES[dtype], torch.Size(int(d) for d in header[5:5 + ndim])


def check_sendable(tensor: torch.Tensor, rank: int, dst: int) -> None:
    if tensor.dtype not in DTYPES:
        raise PipelineError(f"stage {rank} cannot send a {tensor.dtype} tensor to stage {dst}")
    if tensor.dim() > MAX_DIMS:
        raise PipelineError(f"stage {rank} cannot send a {tensor.dim()}-d tensor to stage {dst} "
                            f"(at most {MAX_DIMS} dimensions)")


def packed_bytes(shape: torch.Size, dtype: torch.dtype) -> int:
    return _HEADER_BYTES + shape.numel() * dtype.itemsize


def pack(header: torch.Tensor, payload: torch.Tensor | None = None, size: int | None = None) -> torch.Tensor:
    """One byte buffer holding ``header`` then ``payload`` (zeros up to ``size`` if given)."""
    data = payload.reshape(-1).view(torch.uint8) if payload is not None else None
    out = torch.zeros(size if size is not None else packed_bytes(payload.shape, payload.dtype) if payload is not None
                      else _HEADER_BYTES, dtype=torch.uint8)
    out[:_HEADER_BYTES].view(torch.int64).copy_(header)
    if data is not None:
        out[_HEADER_BYTES:_HEADER_BYTES + data.numel()].copy_(data)
    return out


def unpack(buffer: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """The header and the payload (views of ``buffer``) of a packed message."""
    return buffer[:_HEADER_BYTES].view(torch.int64), buffer[_HEADER_BYTES:].view(dtype).view(shape)
