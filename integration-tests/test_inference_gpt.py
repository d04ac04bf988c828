"""init_inference on the project's own GPT (``examples/gpt.py``): KV-cache decoding token-identical to the
eager loop that recomputes the whole sequence, whole and split over 2 and 4 tensor-parallel ranks; int8
weights (bytes, next-token agreement and perplexity on held-out text against fp32, trained model); and
ZeRO-Inference, weights streamed a layer at a time from host memory or NVMe, with the live weight bytes
measured by walking tensors while it generates."""

from __future__ import annotations

import gc
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zero_all
from zero_comm.testing import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, CharCorpus, GPTConfig

CFG = GPTConfig(vocab_size=96, block_size=64, n_layer=3, n_head=4, n_embd=64)
NEW_TOKENS = 32


def build() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def prompt() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def eager_greedy(model: GPT, ids: torch.Tensor, new: int) -> torch.Tensor:
    for _ in range(new):  # no cache: the whole sequence again for every token
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def served(tp: int) -> dict:
    engine = zero_all.init_inference(build(), tensor_parallel={"tp_size": tp}, dtype=torch.float32)
    out = engine.generate(prompt(), max_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        return {"tokens": out, "logits": engine(out)}


@pytest.mark.parametrize(("world", "tp"), [(1, 1), (2, 2), (4, 4), (4, 2)])  # 4 ranks as 2 groups of 2
def test_kv_cache_decoding_matches_the_eager_loop(world: int, tp: int):
    model = build()
    want = eager_greedy(model, prompt(), NEW_TOKENS)
    with torch.no_grad():
        logits = model(want)
    for got in run_ranks(served, world, tp, timeout=180):
        assert torch.equal(got["tokens"], want)
        assert ((got["logits"] - logits).abs().max() / logits.abs().max()).item() <= 1e-5


def test_sampling_is_seeded_and_stays_within_top_k():
    engine = zero_all.init_inference(build(), dtype="fp32")
    runs = [engine.generate(prompt(), max_new_tokens=16, do_sample=True, top_k=5, temperature=0.7,
                            generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    with torch.no_grad():
        logits = engine.module(runs[0][:, :-1])[:, prompt().shape[1] - 1:]
    top5 = logits.topk(5, dim=-1).indices
    assert bool((top5 == runs[0][:, prompt().shape[1]:, None]).any(-1).all()), "a token outside the top 5"


# -- int8 weights on a trained model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT trained briefly on the standard library's source, and 257 held-out characters after its data."""
    corpus = CharCorpus(max_chars=400_000)
    train = CharCorpus.__new__(CharCorpus)
    train.data = corpus.data[:300_000]
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        x, y = train.batch(step, 16, CFG.block_size)
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("trained") / "gpt.pt"
    torch.save({"model": model.state_dict(), "held": corpus.data[350_000:350_257]}, path)
    return path


def windows(held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every one of the 256 held-out next tokens, each predicted from the up to 63 characters before it
    (left-padded with newlines)."""
    ctx = CFG.block_size - 1
    x = torch.stack([F.pad(held[max(0, i - ctx):i], (ctx - min(i, ctx), 0)) for i in range(1, 257)])
    return x, held[1:257]


def held_out_logits(path: str, dtype: str, tp: int) -> dict:
    saved = torch.load(path, weights_only=True)
    model = GPT(CFG)
    model.load_state_dict(saved["model"])
    engine = zero_all.init_inference(model, dtype=dtype, tensor_parallel={"tp_size": tp})
    x, y = windows(saved["held"])
    with torch.no_grad():
        logits = engine(x)[:, -1]
    return {"logits": logits, "next": y, "ratio": engine.quantized.ratio if engine.quantized else 1.0}


@pytest.mark.parametrize("tp", [1, 2])
def test_int8_weights_are_small_and_predict_as_fp32_does(trained: Path, tp: int):
    fp32 = held_out_logits(str(trained), "fp32", 1)
    for got in run_ranks(held_out_logits, tp, str(trained), "int8", tp, timeout=180):
        want, y = fp32["logits"], fp32["next"]
        agree = (want.argmax(-1) == got["logits"].argmax(-1)).float().mean().item()
        ppl_fp32, ppl_int8 = (math.exp(F.cross_entropy(z, y).item()) for z in (want, got["logits"]))
        print(f"int8, tp {tp}: weight bytes {got['ratio']:.3f}x fp32, next-token agreement {agree:.1%} over 256 "
              f"held-out tokens, perplexity {ppl_int8:.4f} vs fp32 {ppl_fp32:.4f} ({ppl_int8 / ppl_fp32 - 1:+.2%})")
        assert got["ratio"] <= 0.3
        assert agree >= 0.95
        assert abs(ppl_int8 / ppl_fp32 - 1) <= 0.02
        assert ppl_fp32 < 20, "the model did not learn: the comparison would say nothing"


# -- ZeRO-Inference ---------------------------------------------------------------------------------------
def live_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct storage behind the model's parameters and buffers, walked now."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()] if t.numel()}
    return sum(storages.values())


def all_tensor_bytes() -> dict[int, int]:
    found: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on torch.distributed.reduce_op warns that it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
    return found


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_zero_inference_streams_layers_and_generates_the_same(tmp_path: Path, device: str):
    whole = zero_all.init_inference(build(), dtype=torch.float32)
    want = whole.generate(prompt(), max_new_tokens=NEW_TOKENS)
    model = build()
    layer_bytes = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in model.blocks)
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("blocks."))
    offload = {"device": device, "nvme_path": str(tmp_path)} if device == "nvme" else {"device": "cpu"}
    before = set(all_tensor_bytes())
    engine = zero_all.init_inference(model, dtype=torch.float32, zero={"stage": 3, "offload_param": offload})
    assert live_weight_bytes(model) <= rest, "the layers' weights should live in the store between forwards"
    seen: list[tuple[int, int]] = []

    def walk(module, args, output) -> None:
        resident = sum(b for ptr, b in all_tensor_bytes().items() if ptr not in before)
        seen.append((live_weight_bytes(model), resident))

    hooks = [b.attn.proj.register_forward_hook(walk) for b in model.blocks]  # inside the running layer
    got = engine.generate(prompt(), max_new_tokens=NEW_TOKENS)
    for h in hooks:
        h.remove()
    assert torch.equal(got, want)
    peak_model = max(m for m, _ in seen)
    assert peak_model >= layer_bytes + rest, "the walk ran outside the layer: it measured nothing"
    print(f"ZeRO-Inference from {device}: peak live weight bytes in the model {peak_model} "
          f"(layers {layer_bytes} each, embeddings and rest {rest}); peak new CPU tensors {max(r for _, r in seen)}")
    assert peak_model <= 2 * layer_bytes + rest
    if device == "nvme":  # every tensor in the process that was not there before: the store keeps at most two layers
        assert max(r for _, r in seen) <= 2 * layer_bytes + 4 * 4096 + (1 << 20), seen
