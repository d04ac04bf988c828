"""zero_pipe.KVCache: attention over cached keys and values equals attention over the whole sequence,
token by token and in chunks, its memory is fixed when the first token arrives, and misuse is named."""

import pytest
import torch
import torch.nn.functional as F

from zero_pipe import KVCache


def qkv(positions: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, positions, 8, generator=g) for _ in range(3))  # type: ignore[return-value]


def cached_attention(q, k, v, chunks: list[int], layers: int = 2) -> torch.Tensor:
    cache = KVCache(max_len=q.shape[2])
    out, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        mask = cache.attention_mask(n)
        causal = cache.offset == 0 and n > 1
        for layer in range(layers):
            keys, values = cache.update(layer, k[:, :, sl], v[:, :, sl])
            y = F.scaled_dot_product_attention(q[:, :, sl], keys, values, attn_mask=mask, is_causal=causal)
        cache.advance(n)
        out.append(y)
        start += n
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("chunks", [[10], [1] * 10, [4, 1, 1, 1, 3], [3, 5, 2]])
def test_cached_attention_equals_causal_attention_over_the_whole_sequence(chunks: list[int]):
    q, k, v = qkv(sum(chunks))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(cached_attention(q, k, v, chunks), want, rtol=1e-6, atol=1e-6)


def test_memory_is_allocated_once_for_max_len():
    cache = KVCache(max_len=16)
    _, k, v = qkv(16)
    cache.update(0, k[:, :, :4], v[:, :, :4])
    cache.advance(4)
    full = cache.nbytes()
    assert full == 2 * k.numel() * k.element_size()  # the whole 16 positions, from the first write
    for i in range(4, 16):
        cache.update(0, k[:, :, i:i + 1], v[:, :, i:i + 1])
        cache.advance(1)
    assert cache.nbytes() == full and cache.offset == 16
    cache.reset()
    assert cache.offset == 0 and cache.nbytes() == full


def test_misuse_is_named():
    cache = KVCache(max_len=4)
    _, k, v = qkv(5)
    with pytest.raises(ValueError, match="reaches 5 positions; this KV cache holds 4"):
        cache.update(0, k, v)
    with pytest.raises(ValueError, match="share one"):
        cache.update(0, k[:, :, :2], v[:, :, :1])
    cache.update(0, k[:, :, :2], v[:, :, :2])
    cache.advance(2)
    with pytest.raises(ValueError, match="do not match the cache"):
        cache.update(0, k[:1, :, :1], v[:1, :, :1])
    with pytest.raises(ValueError, match="passes this cache's 4 positions"):
        cache.advance(3)
    with pytest.raises(ValueError, match="max_len >= 1"):
        KVCache(0)
