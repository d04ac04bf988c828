"""Activation checkpointing: the same loss and gradients as none (bitwise, fp32, with dropout), much
less activation memory, and DeepSpeed's options (CPU offload, partitioning across the tensor-parallel
group, selective recomputation, segments, model-parallel RNG streams)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zero_comm
from zero_ckpt import ActivationCheckpointConfig, ActivationCheckpointing, RNGStatesTracker
from zero_comm.testing import run_ranks

D, T, LAYERS = 64, 32, 8


class Block(nn.Module):
    def __init__(self, tracker: RNGStatesTracker | None = None):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.tracker = tracker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        x = x + F.dropout(F.scaled_dot_product_attention(q, k, v, is_causal=True), 0.1)
        h = F.gelu(self.fc1(x))
        if self.tracker is not None:  # a tensor-parallel region draws from its own stream
            with self.tracker.fork():
                h = F.dropout(h, 0.2)
        return x + F.dropout(self.fc2(h), 0.1)


class GPT(nn.Module):
    def __init__(self, tracker: RNGStatesTracker | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(128, D)
        self.blocks = nn.ModuleList(Block(tracker) for _ in range(LAYERS))
        self.head = nn.Linear(D, 128)

    def forward(self, idx: torch.Tensor, ckpt: ActivationCheckpointing | None) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = ckpt.checkpoint(block, x) if ckpt is not None else block(x)
        return F.cross_entropy(self.head(x).view(-1, 128), idx.roll(-1, 1).view(-1))


def peak_during(fn) -> int:
    """Peak bytes allocated on the CPU during ``fn()`` (the profiler's allocation events, replayed)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = [0]
    for _, n in events:
        live.append(live[-1] + n)
    return max(live)


def run(model: GPT, ckpt: ActivationCheckpointing | None, idx: torch.Tensor) -> tuple[float, list, int]:
    torch.manual_seed(42)
    holder = {}
    peak = peak_during(lambda: holder.setdefault("loss", model(idx, ckpt)))
    loss = holder.pop("loss")
    model.zero_grad()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()], peak


def make_tracker() -> RNGStatesTracker:
    tracker = RNGStatesTracker()
    tracker.add("model-parallel", 1234)
    return tracker


@pytest.mark.parametrize("options", [{}, {"cpu_checkpointing": True}, {"selective": ["matmul"]}])
def test_checkpointed_training_equals_plain_bitwise_with_much_less_activation_memory(options):
    idx = torch.randint(0, 128, (4, T), generator=torch.Generator().manual_seed(1))
    plain_tracker, ckpt_tracker = make_tracker(), make_tracker()
    want_loss, want_grads, plain_peak = run(GPT(plain_tracker), None, idx)
    ckpt = ActivationCheckpointing(ActivationCheckpointConfig(**options), rng_tracker=ckpt_tracker)
    loss, grads, peak = run(GPT(ckpt_tracker), ckpt, idx)
    assert loss == want_loss
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads)), "gradients bitwise equal"
    assert ckpt.stats.recomputations == LAYERS, "the tracker's stream was replayed for every recomputation"
    if not options.get("selective"):
        assert peak <= 0.6 * plain_peak, f"forward peak {peak} vs {plain_peak} bytes without checkpointing"
    else:  # keeps the matmul outputs: between the two
        assert peak < plain_peak
    boundary = LAYERS * 4 * T * D * 4  # each block's input, fp32
    if options.get("cpu_checkpointing"):
        assert ckpt.stats.offloaded_bytes == boundary and ckpt.stats.kept_bytes == 0, ckpt.stats
    elif not options:
        assert ckpt.stats.kept_bytes == boundary


def test_sequential_segments():
    layers = nn.Sequential(*[nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(6)])
    x = torch.randn(3, D, requires_grad=True)
    want = layers(x)
    want.sum().backward()
    want_grad = x.grad.clone()
    x.grad = None
    ckpt = ActivationCheckpointing(ActivationCheckpointConfig(number_checkpoints=3))
    got = ckpt.sequential(layers, x)
    got.sum().backward()
    assert torch.equal(got, want) and torch.equal(x.grad, want_grad)
    assert ckpt.stats.kept_bytes == 2 * 3 * D * 4, "two checkpointed segments keep their input; the last runs plain"


def partitioned(partition: bool) -> dict:
    comm = zero_comm.init_distributed()
    idx = torch.randint(0, 128, (4, T), generator=torch.Generator().manual_seed(1))
    ckpt = ActivationCheckpointing(ActivationCheckpointConfig(partition_activations=partition), tp_comm=comm)
    loss, grads, _ = run(GPT(), ckpt, idx)
    return {"loss": loss, "grads": grads, "stats": ckpt.stats}


def test_partitioned_activations_split_the_kept_inputs_across_the_group():
    plain = run_ranks(partitioned, 2, False)[0]
    for r in run_ranks(partitioned, 2, True):
        assert r["loss"] == plain["loss"]
        assert all(torch.equal(a, b) for a, b in zip(r["grads"], plain["grads"]))
        assert r["stats"].partitioned_bytes * 2 == plain["stats"].kept_bytes, "each rank keeps half"


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="number_checkpoints must be >= 1"):
        ActivationCheckpointConfig(number_checkpoints=0)
    with pytest.raises(ValueError, match="needs the tensor-parallel group"):
        ActivationCheckpointing(ActivationCheckpointConfig(partition_activations=True))
    import msgspec

    with pytest.raises(msgspec.ValidationError, match="cpu_checkpointin"):
        msgspec.convert({"cpu_checkpointin": True}, ActivationCheckpointConfig)
