"""Token-by-token decoding: a prompt's forward fills a key/value cache, then one token per forward.

One loop serves every kind of model; only the forward differs (:class:`Decoder`):
a model taking ``kv_cache`` gets a preallocated :class:`zero_pipe.KVCache`, a Hugging
Face model its own ``DynamicCache``, any other model the whole sequence again each
step. Choosing a token follows Hugging Face's ``generate``: greedy by default;
``do_sample`` with ``temperature``, ``top_k`` and ``top_p``; a sequence that emits
``eos_token_id`` is finished and padded with ``pad_token_id`` until all are. Under
tensor parallelism every rank holds the same logits after the last all-reduce, so a
greedy choice agrees by construction; a sampled one is broadcast from the group's
first rank so the ranks never diverge.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zero_comm import Communicator
from zero_pipe import KVCache

from ._models import is_hf, takes_kv_cache

__all__ = ["Decoder", "Sampling", "decode"]


class Decoder:
    """``step(new_ids) -> logits of the last position`` for one sequence batch, with its cache."""

    def __init__(self, model: nn.Module, max_len: int):
        self.model = model
        if takes_kv_cache(model):
            self.kind = "kv_cache"
            self.cache: object = KVCache(max_len)
        elif is_hf(model):
            from transformers import DynamicCache  # an HF model: transformers is installed

            self.kind = "hf"
            config: Any = model.config
            self.cache = DynamicCache(config=config)
            params = inspect.signature(model.forward).parameters
            self.cache_key = "cache" if "cache" in params else "past_key_values"
            # only the last position's logits are needed: the prompt's forward skips the rest of the head
            self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        else:
            self.kind = "plain"
            self.seen: torch.Tensor | None = None

    def step(self, new: torch.Tensor) -> torch.Tensor:
        if self.kind == "kv_cache":
            out = self.model(new, kv_cache=self.cache)
        elif self.kind == "hf":
            out = self.model(input_ids=new, **{self.cache_key: self.cache}, use_cache=True, **self.extra)
        else:
            self.seen = new if self.seen is None else torch.cat([self.seen, new], dim=1)
            out = self.model(self.seen)
        logits = getattr(out, "logits", out)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise TypeError(f"{type(self.model).__name__} returned {type(logits).__name__}; decoding needs logits "
                            "of shape (batch, positions, vocabulary)")
        return logits[:, -1]


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        scores = logits.float() / max(self.temperature, 1e-6)
        if self.top_k > 0:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            beyond = probs.cumsum(-1) - probs > self.top_p  # the mass before a token already exceeds p
            scores = scores.scatter(-1, order, ordered.masked_fill(beyond, float("-inf")))
        probs = scores.softmax(-1)
        gen = self.generator
        return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


def decode(model: nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int, max_len: int, sampling: Sampling,
           eos: Sequence[int] = (), pad: int | None = None, tp: Communicator | None = None,
           on_token: Callable[[int], None] | None = None) -> torch.Tensor:
    """``input_ids`` followed by up to ``max_new_tokens`` chosen tokens (fewer when every sequence ended)."""
    decoder = Decoder(model, max_len)
    ids = input_ids
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    eos_ids = torch.tensor(list(eos), dtype=ids.dtype, device=ids.device)
    new = ids
    for i in range(max_new_tokens):
        chosen = sampling.choose(decoder.step(new))
        if sampling.do_sample and tp is not None and tp.world_size > 1:
            tp.broadcast(chosen, src=0)  # every rank continues with the first rank's draw
        if eos_ids.numel():
            chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad if pad is not None else eos[0]))
        new = chosen.unsqueeze(1)
        ids = torch.cat([ids, new], dim=1)
        if on_token is not None:
            on_token(i)
        if eos_ids.numel():
            unfinished &= ~torch.isin(chosen, eos_ids)
            if not bool(unfinished.any()):
                break
    return ids
