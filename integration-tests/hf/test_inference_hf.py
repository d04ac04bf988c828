"""init_inference on Hugging Face causal LMs (GPT-2 and Llama built from tiny configs with a fixed seed):
greedy generation token-identical to the model's own ``generate`` and logits within 1e-5 relative, whole
and split over 2 and 4 tensor-parallel ranks; the one-line errors a bad tensor-parallel size gets."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the nox session `hf` installs it

import zero_all  # noqa: E402
import zero_comm  # noqa: E402
from zero_all import ConfigError  # noqa: E402
from zero_comm.testing import run_ranks  # noqa: E402

NEW_TOKENS = 32


def build(kind: str, heads: int = 4, kv_heads: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=heads, n_embd=16 * heads, vocab_size=256, n_positions=128,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:  # grouped-query attention: 8 query heads share 4 key/value heads
        cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=2 * heads, num_key_value_heads=kv_heads,
                                       hidden_size=64, intermediate_size=128, vocab_size=256,
                                       max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
        model = transformers.LlamaForCausalLM(cfg)
    return model.eval()


def prompt() -> torch.Tensor:
    return torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(1))


def reference(kind: str) -> dict:
    model = build(kind)
    ids = prompt()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        logits = model(out).logits
    return {"tokens": out, "logits": logits}


def served(kind: str, tp: int) -> dict:
    model = build(kind)
    engine = zero_all.init_inference(model, tensor_parallel={"tp_size": tp}, dtype=torch.float32,
                                     replace_with_kernel_inject=True)
    ids = prompt()
    ledger = engine.tp.ledger if engine.tp is not None else zero_comm.CommLedger()
    with ledger.measure() as booked:
        out = engine.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    with torch.no_grad():
        logits = engine(out).logits
    return {"tokens": out, "logits": logits, "reduces": booked.entry("all_reduce").calls}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_greedy_generation_matches_the_models_own_generate(kind: str, tp: int):
    want = reference(kind)
    for got in run_ranks(served, tp, kind, tp, timeout=240):
        assert torch.equal(got["tokens"], want["tokens"]), (got["tokens"], want["tokens"])
        scale = want["logits"].abs().max()
        assert ((got["logits"] - want["logits"]).abs().max() / scale).item() <= 1e-5
        # Megatron's split: one all-reduce after each attention and each MLP, per forward (one per token)
        assert got["reduces"] == (0 if tp == 1 else NEW_TOKENS * 2 * 2), got["reduces"]


def bad_tp(kind: str, heads: int, kv_heads: int, tp: int) -> str:
    try:
        zero_all.init_inference(build(kind, heads, kv_heads), tensor_parallel={"tp_size": tp}, dtype=torch.float32)
    except ConfigError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize(("kind", "heads", "kv_heads", "says"), [
    ("gpt2", 3, 3, "2 does not divide the model's 3 attention heads (GPT2LMHeadModel.config.num_attention_heads)"),
    ("llama", 4, 1, "2 does not divide the model's 1 key/value heads (LlamaForCausalLM.config.num_key_value_heads)"),
])
def test_heads_that_do_not_divide_are_a_one_line_error_naming_the_dimension(kind, heads, kv_heads, says):
    for message in run_ranks(bad_tp, 2, kind, heads, kv_heads, 2):
        assert message == f"tensor_parallel.tp_size: {says}", message


def test_zero_generate_on_a_saved_hugging_face_model(tmp_path):
    import json
    import os
    import subprocess
    import sys

    model = build("gpt2")
    model.save_pretrained(tmp_path / "tiny-gpt2")
    ids = prompt()[:1]
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    for tp in ("1", "2"):
        done = subprocess.run([sys.executable, "-m", "zero_all", "generate", "--model", str(tmp_path / "tiny-gpt2"),
                               "--prompt-ids", ",".join(map(str, ids[0].tolist())), "--max-new-tokens", "10",
                               "--tp", tp], capture_output=True, text=True, timeout=240, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == want[0].tolist()


def hf_options(kind: str) -> dict:
    """What only Hugging Face's generate does, through the engine: its results, as the model's own."""
    model = build(kind)
    model.generation_config.repetition_penalty = 5.0
    engine = zero_all.init_inference(model, dtype=torch.float32)
    ids = prompt()
    padded = torch.cat([torch.zeros(2, 2, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.tensor([[0, 0], [1, 1]]), torch.ones_like(ids)], dim=1)
    return {"penalty": engine.generate(ids, max_new_tokens=12, eos_token_id=None),
            "default": engine.generate(ids, eos_token_id=None),
            "beams": engine.generate(input_ids=padded, attention_mask=mask, num_beams=2, max_new_tokens=6,
                                     eos_token_id=None, pad_token_id=0)}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_options_beyond_zeros_loop_give_the_models_own_results(kind: str):
    got = hf_options(kind)
    model = build(kind)
    model.generation_config.repetition_penalty = 5.0
    ids = prompt()
    padded = torch.cat([torch.zeros(2, 2, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.tensor([[0, 0], [1, 1]]), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        assert torch.equal(got["penalty"], model.generate(ids, max_new_tokens=12, eos_token_id=None))
        assert torch.equal(got["default"], model.generate(ids, eos_token_id=None))  # HF's default length
        assert torch.equal(got["beams"], model.generate(input_ids=padded, attention_mask=mask, num_beams=2,
                                                        max_new_tokens=6, eos_token_id=None, pad_token_id=0))


def sampled_through_hf(kind: str) -> torch.Tensor:
    import torch.distributed as dist

    torch.manual_seed(100 + dist.get_rank())  # ranks' own generators differ: the engine must agree a seed
    engine = zero_all.init_inference(build(kind), tensor_parallel={"tp_size": 2}, dtype=torch.float32)
    ids = prompt()
    padded = torch.cat([torch.zeros(2, 2, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.tensor([[0, 0], [1, 1]]), torch.ones_like(ids)], dim=1)
    ours = engine.generate(ids, do_sample=True, max_new_tokens=8, eos_token_id=None)  # zero's loop
    theirs = engine.generate(input_ids=padded, attention_mask=mask, do_sample=True, max_new_tokens=8,
                             pad_token_id=0, eos_token_id=None)  # the model's own generate
    return torch.cat([ours.flatten(), theirs.flatten()])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sampling_under_tensor_parallelism_never_diverges_across_ranks(kind: str):
    first, second = run_ranks(sampled_through_hf, 2, kind, timeout=240)
    assert torch.equal(first, second)


def test_a_generation_config_switching_extra_outputs_off_still_decodes_in_zeros_loop():
    model = build("gpt2")
    model.generation_config.output_attentions = False  # as transformers writes them from a model's config
    model.generation_config.output_hidden_states = False
    engine = zero_all.init_inference(model, dtype=torch.float32)
    tokens: list[int] = []
    out = engine.generate(prompt(), max_new_tokens=5, eos_token_id=None, on_token=tokens.append)
    assert tokens == list(range(5)), "on_token is called by zero's loop only: the model's own generate ran"
    model.generation_config.output_attentions = True  # asked for: only the model's own generate gives them
    assert engine.generate(prompt(), max_new_tokens=5, eos_token_id=None, on_token=tokens.append) is not None
    assert len(tokens) == 5
    assert out.shape[1] == prompt().shape[1] + 5
