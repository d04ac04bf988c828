"""``generate``'s options, resolved as Hugging Face's ``generate`` resolves them, and checked.

zero's own decoding loop handles greedy and sampled decoding of unpadded batches with
``max_new_tokens``/``max_length``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``
and ``pad_token_id``. Anything else -- beams, a padded ``attention_mask``, a
``generation_config`` that sets a repetition penalty -- is what only a Hugging Face
model's own ``generate`` does: :func:`needs_hf_generate` says when to hand over, and a
model without one gets a one-line error rather than options silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._models import model_dimension

__all__ = ["DecodeOptions", "needs_hf_generate", "resolve_options"]

OURS = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
        "pad_token_id", "attention_mask", "generator", "num_beams", "use_cache"}
# generation_config entries our loop honours or that do not change greedy/sampled decoding
_CONFIG_OURS = OURS | {"bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
                       "return_dict_in_generate", "output_scores", "output_logits"}
# asked for extra outputs zero's loop does not give; switched off (what transformers 5 writes into a
# generation_config made from a model's config) they ask for nothing
_OFF_IS_OURS = {"output_attentions", "output_hidden_states"}
_HF_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "max_length": 20}


@dataclass(frozen=True)
class DecodeOptions:
    new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos: list[int]
    pad: int | None
    generator: torch.Generator | None


def _padded(mask: Any) -> bool:
    return isinstance(mask, torch.Tensor) and not bool(torch.all(mask == 1))


def _config_diff(model: nn.Module) -> dict[str, Any]:
    gen: Any = getattr(model, "generation_config", None)
    diff = gen.to_diff_dict() if hasattr(gen, "to_diff_dict") else {}
    return {k: v for k, v in diff.items() if v is not None}


def needs_hf_generate(model: nn.Module, hf: bool, kwargs: Mapping[str, Any]) -> bool:
    """Whether these options need a model's own ``generate`` (a one-line error where there is none)."""
    beyond = sorted(set(kwargs) - OURS)
    special = [k for k, bad in (("num_beams", kwargs.get("num_beams", 1) != 1),
                                ("use_cache", kwargs.get("use_cache", True) is False),
                                ("attention_mask", _padded(kwargs.get("attention_mask")))) if bad]
    if not hf:
        if beyond:
            raise TypeError(f"generate: unknown option(s) {beyond} for {type(model).__name__}")
        if special:
            raise ValueError(f"generate: {special[0]} {'with padding ' if special[0] == 'attention_mask' else ''}"
                             f"needs a Hugging Face model's own generate; zero's loop decodes unpadded batches, "
                             "greedy or sampled, with a cache")
        return False
    config = _config_diff(model)
    config_beyond = [k for k, v in config.items() if (k not in _CONFIG_OURS and not (k in _OFF_IS_OURS and not v))
                     or (k == "num_beams" and v != 1)]
    return bool(beyond or special or config_beyond)


def resolve_options(model: nn.Module, hf: bool, kwargs: Mapping[str, Any], input_ids: torch.Tensor,
                    max_out_tokens: int) -> DecodeOptions:
    """The options for zero's loop: the call's, then (Hugging Face) the model's ``generation_config``, then
    Hugging Face's defaults; each checked, with a one-line ``ValueError`` naming a bad one."""
    given = {k: v for k, v in kwargs.items() if v is not None}
    config = _config_diff(model) if hf else {}
    merged = {**config, **given}

    def pick(key: str, default: Any) -> Any:
        return merged.get(key, _HF_DEFAULTS.get(key, default) if hf else default)

    prompt = input_ids.shape[1]
    if prompt == 0:
        raise ValueError("generate: the prompt is empty; give at least one token")
    found = model_dimension(model, ("vocab_size",))
    vocab = found[0] if found else None
    if vocab is not None and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
        raise ValueError(f"generate: token ids must be in [0, {vocab}) for this model's vocabulary; the prompt "
                         f"holds {int(input_ids.min())}..{int(input_ids.max())}")
    limit = model_dimension(model, ("max_position_embeddings", "n_positions", "block_size"))
    if "max_new_tokens" in given or ("max_new_tokens" in config and "max_length" not in given):
        new = int(merged["max_new_tokens"])
    elif "max_length" in merged:
        new = int(merged["max_length"]) - prompt
        if new <= 0:
            raise ValueError(f"generate: max_length {merged['max_length']} leaves no room after the {prompt}-token "
                             "prompt; give max_new_tokens")
    else:  # Hugging Face's default: 20 new tokens, within the model's positions
        new = 20
        if limit is not None:
            new = max(min(new, limit[0] - prompt), 0)
    if new < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {new}")
    if limit is not None and prompt + new > limit[0]:
        raise ValueError(f"generate: {prompt} prompt + {new} new tokens exceed the model's {limit[0]} positions "
                         f"({limit[1]})")
    if prompt + new > max_out_tokens:
        raise ValueError(f"generate: {prompt} prompt + {new} new tokens exceed max_out_tokens {max_out_tokens} "
                         "(raise it in init_inference)")
    do_sample = bool(pick("do_sample", False))
    temperature, top_k, top_p = float(pick("temperature", 1.0)), int(pick("top_k", 0)), float(pick("top_p", 1.0))
    if do_sample and temperature <= 0:
        raise ValueError(f"generate: temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in [0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"generate: top_k must be >= 0, got {top_k}")
    eos = merged.get("eos_token_id")
    eos_list = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    pad = merged.get("pad_token_id")
    if pad is None and eos_list:
        pad = eos_list[0]
    return DecodeOptions(new, do_sample, temperature, top_k, top_p, eos_list, pad, merged.get("generator"))
