"""A DeepSpeed-style training loop through zero_all.initialize trains exactly like a plain torch loop,
and its checkpoints resume exactly."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zero_all as deepspeed
import zero_optim
from zero_comm.testing import run_ranks

STEPS, MICRO, ACCUM, LR = 6, 4, 2, 1e-2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


def micro_batch(step: int, micro: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s part of micro-batch ``micro`` of optimizer step ``step``."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(MICRO * world, 16, generator=g)
    y = (x[:, :4].argmax(1) + step) % 4
    mine = slice(rank * MICRO, (rank + 1) * MICRO)
    return x[mine], y[mine]


def reference(world: int, clip: float, make_optimizer=None, make_scheduler=None) -> list[float]:
    """The plain loop on the whole global batch (torch AdamW unless ``make_optimizer(params)`` says
    otherwise; ``make_scheduler(optimizer)`` stepped after each step)."""
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer(model.parameters()) if make_optimizer else torch.optim.AdamW(model.parameters(), lr=LR,
                                                                                     weight_decay=0.01)
    schedule = make_scheduler(opt) if make_scheduler else None
    losses = []
    for step in range(STEPS):
        total = 0.0
        for micro in range(ACCUM):
            x, y = (torch.cat(t) for t in zip(*(micro_batch(step, micro, r, world) for r in range(world))))
            loss = model(x, y) / ACCUM
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()
        losses.append(total)
    return losses


def train_step(engine, step: int) -> float:
    """One optimizer step of DeepSpeed's loop (ACCUM micro-batches); the mean loss over every rank."""
    total = torch.zeros(())
    for micro in range(ACCUM):
        assert engine.is_gradient_accumulation_boundary() == (micro == ACCUM - 1)
        loss = engine(*micro_batch(step, micro, engine.comm.rank, engine.comm.world_size))
        engine.backward(loss)
        engine.step()
        total += loss.detach() / ACCUM
    return engine.comm.all_reduce(total, "avg").item()


def config(stage: int, offload: str | None, clip: float, root: str) -> dict:
    zero: dict = {"stage": stage, "reduce_bucket_size": 2000, "stage3_param_persistence_threshold": 100}
    if offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload == "nvme":
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": root}
        zero["offload_param"] = {"device": "nvme", "nvme_path": root}
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
            "gradient_clipping": clip, "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}}}


def deepspeed_script(stage: int, offload: str | None, clip: float, root: str, resume_at: int | None) -> dict:
    """The loop a DeepSpeed user writes, unchanged but for the import."""
    torch.manual_seed(0)
    model = Net()
    engine, _, _, _ = deepspeed.initialize(model=model, config=config(stage, offload, clip, root))
    losses = []
    first = 0
    if resume_at is not None:
        _, client = engine.load_checkpoint(Path(root) / "ckpt")
        first = client["step"]
    for step in range(first, STEPS):
        losses.append(train_step(engine, step))
        if resume_at is None and step + 1 == 3:
            engine.save_checkpoint(Path(root) / "ckpt", client_state={"step": 3})
    return {"losses": losses, "global_steps": engine.global_steps,
            "batch": (engine.train_batch_size(), engine.gradient_accumulation_steps())}


@pytest.mark.parametrize(("stage", "offload"), [(0, None), (2, None), (3, None), (2, "cpu"), (3, "nvme")])
def test_a_deepspeed_script_matches_plain_torch_and_resumes(tmp_path: Path, stage: int, offload: str | None):
    world = 2
    want = run_ranks(reference, 1, world, 0.5)[0]
    straight = run_ranks(deepspeed_script, world, stage, offload, 0.5, str(tmp_path), None)[0]
    assert straight["batch"] == (MICRO * ACCUM * world, ACCUM) and straight["global_steps"] == STEPS
    err = max(abs(a - b) / abs(b) for a, b in zip(straight["losses"], want, strict=True))
    assert err <= 1e-5, f"stage {stage} offload {offload}: {straight['losses']} vs {want}"
    resumed = run_ranks(deepspeed_script, world, stage, offload, 0.5, str(tmp_path), 3)[0]
    assert resumed["losses"] == straight["losses"][3:] and resumed["global_steps"] == STEPS


def test_without_an_optimizer_the_engine_evaluates_and_refuses_to_train():
    torch.manual_seed(0)
    model = Net()
    x, y = micro_batch(0, 0, 0, 1)
    want = model(x, y)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, config={"train_batch_size": 4})
    assert optimizer is None and scheduler is None  # DeepSpeed's evaluation-only engine
    with torch.no_grad():
        assert torch.equal(engine(x, y), want)
    loss = engine(x, y)
    with pytest.raises(RuntimeError, match=r"engine.backward\(\): this engine was initialized without an optimizer"):
        engine.backward(loss)
    with pytest.raises(RuntimeError, match=r"engine.step\(\): .* add an \"optimizer\" block"):
        engine.step()


def save_16bit(stage: int, gather: bool, root: str) -> dict:
    torch.manual_seed(0)
    cfg = config(stage, None, 0.0, root)
    cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = gather
    engine, _, _, _ = deepspeed.initialize(model=Net(), config=cfg)
    nothing = engine.load_checkpoint(Path(root) / "no-checkpoint-here")  # a fresh run tries to resume
    for step in range(2):
        train_step(engine, step)
    saved = engine.save_16bit_model(root, "model.bin")
    x, y = micro_batch(7, 0, 0, 1)  # the same batch on every rank
    engine.eval()
    with torch.no_grad():
        loss = engine(x, y).item()
    return {"nothing": nothing, "saved": saved, "loss": loss}


@pytest.mark.parametrize(("stage", "gather"), [(1, False), (3, True), (3, False)])
def test_save_16bit_model_writes_the_trained_weights_whole(tmp_path: Path, stage: int, gather: bool):
    results = run_ranks(save_16bit, 2, stage, gather, str(tmp_path))
    assert all(r["nothing"] == (None, None) for r in results)
    if stage == 3 and not gather:  # DeepSpeed's rule: stage 3 gathers only when the config says so
        assert not any(r["saved"] for r in results) and not (tmp_path / "model.bin").exists()
        return
    assert all(r["saved"] for r in results)
    model = Net()
    model.load_state_dict(torch.load(tmp_path / "model.bin"))  # every key, whole shapes
    with torch.no_grad():
        assert model(*micro_batch(7, 0, 0, 1)).item() == pytest.approx(results[0]["loss"], rel=1e-6)
    assert not list(tmp_path.glob("*.partial"))


class NormNet(nn.Module):
    """A BatchNorm (running statistics: buffers) and a frozen embedding of the label offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Linear(32, 4))
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.to(self.frozen.dtype)  # the script casts its inputs for fp16/bf16, as with DeepSpeed
        return F.cross_entropy((self.net(x) + self.frozen).float(), y)


def buffers_script(stage: int, root: str, precision: str | None = None) -> dict:
    """``precision``: fp16 or bf16 also cast the buffers and the frozen weight (DeepSpeed's module.half())."""
    def ds_config() -> dict:
        return {**config(stage, None, 0.0, root), **({precision: {"enabled": True}} if precision else {})}

    torch.manual_seed(0)
    model = NormNet()
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config())
    dtypes = {str(b.dtype) for b in model.net[1].buffers() if b.is_floating_point()} | {str(model.frozen.dtype)}
    for step in range(2):
        train_step(engine, step)
    engine.save_checkpoint(Path(root) / "ckpt")
    saved = {k: v.clone() for k, v in model.net[1].state_dict().items()}
    frozen = model.frozen.detach().clone()
    after = [train_step(engine, step) for step in (2, 3)]
    torch.manual_seed(1)  # other initial weights, buffers and frozen weight: the checkpoint must set them
    fresh = NormNet()
    engine, _, _, _ = deepspeed.initialize(model=fresh, config=ds_config())
    engine.load_checkpoint(Path(root) / "ckpt")
    loaded = fresh.net[1].state_dict()
    return {"buffers_equal": all(torch.equal(loaded[k], v) for k, v in saved.items()),
            "frozen_equal": torch.equal(fresh.frozen, frozen),
            "after": after, "resumed": [train_step(engine, step) for step in (2, 3)], "dtypes": dtypes}


@pytest.mark.parametrize(("stage", "precision"), [(1, None), (3, None), (1, "fp16"), (3, "bf16")])
def test_a_checkpoint_keeps_buffers_and_frozen_weights(tmp_path: Path, stage: int, precision: str | None):
    results = run_ranks(buffers_script, 2, stage, str(tmp_path), precision)
    want = {None: "torch.float32", "fp16": "torch.float16", "bf16": "torch.bfloat16"}[precision]
    assert all(r["dtypes"] == {want} for r in results), results
    # every rank resumes with rank 0's buffers (a BatchNorm's statistics differ by rank), as in DeepSpeed
    assert results[0]["buffers_equal"]
    for rank, got in enumerate(results):
        assert got["frozen_equal"] and got["resumed"] == got["after"], (rank, got)


@pytest.mark.parametrize("threshold", [0, 10**9])
def test_deepspeeds_module_granularity_threshold_reaches_stage_3s_units(threshold: int):
    torch.manual_seed(0)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_module_granularity_threshold": threshold}
    model = Net()
    engine, _, _, _ = deepspeed.initialize(model=model, config={
        "train_batch_size": 4, "zero_optimization": zero, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    assert engine.optimizer.config.granularity_threshold == threshold
    want = zero_optim.unit_parameters(model, engine.optimizer.config.unit_numel, threshold)
    assert [u.params for u in engine.optimizer.units] == [[p for _, p in unit] for unit in want]
