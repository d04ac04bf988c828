"""A key/value cache for autoregressive decoding, preallocated so each token costs the same.

Generating token ``t`` without a cache recomputes attention's keys and values for
all ``t`` tokens before it; with one, each layer appends its new keys and values and
attends over what is stored. Hugging Face's dynamic cache grows by concatenation,
which copies the whole cache every token (cost growing with the sequence); this
one allocates ``max_len`` positions per layer on first use and writes in place, so
the cost of storing a token stays flat. Buffers take their shape from the first
keys written (batch, heads, head size), so under tensor parallelism each rank holds
only its own heads.

A model uses it in three calls: ``cache.offset`` (positions already stored: where
the new tokens' positions start), ``cache.update(layer, k, v)`` in each attention
(returns every stored key and value, the new ones included) and, once the forward
has run every layer, ``cache.advance(t)``.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of a model's attention layers, up to ``max_len`` positions each.

    Args:
        max_len: the most positions a sequence may reach (prompt plus generated tokens);
            each layer's memory is ``2 * batch * heads * max_len * head_dim`` elements,
            allocated when the layer first writes.
    """

    def __init__(self, max_len: int):
        if max_len < 1:
            raise ValueError(f"a KV cache needs max_len >= 1, got {max_len}")
        self.max_len = max_len
        self.offset = 0
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (batch, heads, new positions, head size) after the ``offset`` positions already
        held for ``layer``; return that layer's keys and values for every position so far."""
        if layer < 0:
            raise IndexError(f"layer index {layer} is negative")
        if k.shape != v.shape or k.dim() != 4:
            raise ValueError(f"keys and values must share one (batch, heads, positions, head size) shape, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        end = self.offset + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the sequence reaches {end} positions; this KV cache holds {self.max_len} "
                             "(raise max_out_tokens / max_len)")
        keys, values = self._keys.get(layer), self._values.get(layer)
        if keys is None or values is None or keys.shape[:2] != k.shape[:2] or keys.shape[3] != k.shape[3]:
            if self.offset:
                raise ValueError(f"layer {layer}: keys of shape {tuple(k.shape)} do not match the cache's "
                                 f"{None if keys is None else tuple(keys.shape)} with {self.offset} positions held")
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            keys = self._keys[layer] = torch.empty(shape, dtype=k.dtype, device=k.device)
            values = self._values[layer] = torch.empty(shape, dtype=v.dtype, device=v.device)
        keys[:, :, self.offset:end] = k
        values[:, :, self.offset:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def attention_mask(self, new: int, device: torch.device | None = None) -> torch.Tensor | None:
        """The boolean mask (True: may attend) for ``new`` queries after ``offset`` stored positions, or
        None where plain causal attention is right (nothing stored) or nothing is masked (one query)."""
        if self.offset == 0 or new == 1:
            return None
        rows = torch.arange(new, device=device).unsqueeze(1) + self.offset
        return torch.arange(self.offset + new, device=device).unsqueeze(0) <= rows

    def advance(self, new: int) -> None:
        """Mark ``new`` positions as stored, once every layer has written them."""
        if self.offset + new > self.max_len:
            raise ValueError(f"advancing by {new} passes this cache's {self.max_len} positions")
        self.offset += new

    def reset(self) -> None:
        """Forget every stored position (the buffers are kept for the next sequence)."""
        self.offset = 0

    def nbytes(self) -> int:
        """Bytes the cache's buffers take."""
        return sum(t.numel() * t.element_size() for t in (*self._keys.values(), *self._values.values()))

    def __repr__(self) -> str:
        return f"KVCache(layers={len(self._keys)}, max_len={self.max_len}, offset={self.offset}, bytes={self.nbytes()})"
