"""initialize(model=deepspeed.pipe.PipelineModule(...)) gives DeepSpeed's pipeline engine: train_batch
trains exactly like a plain torch loop (tied layers across stages and ZeRO-1 over the data-parallel
replicas included), checkpoints resume exactly, and what it cannot run is refused by name."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zero_all as deepspeed
from zero_all.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from zero_comm.testing import RankFailure, run_ranks

STEPS, MICRO, ACCUM, LR, SEED = 4, 2, 3, 1e-2, 1234


def transposed(tie: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x @ tie.weight


def layers(tied: bool, norm: bool = False) -> list:
    first = TiedLayerSpec("tie", nn.Linear, 8, 8, bias=False) if tied else LayerSpec(nn.Linear, 8, 8, bias=False)
    last = (TiedLayerSpec("tie", nn.Linear, 8, 8, bias=False, forward_fn=transposed) if tied
            else LayerSpec(nn.Linear, 8, 8, bias=False))
    # norm: running statistics that only evaluation reads, so only a checkpoint that keeps buffers resumes them
    middle = [LayerSpec(nn.BatchNorm1d, 8)] if norm else []
    return [first, LayerSpec(nn.Linear, 8, 8), *middle, LayerSpec(nn.Tanh), last, LayerSpec(nn.Tanh),
            LayerSpec(nn.Linear, 8, 4)]


def micro_batch(step: int, micro: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-parallel replica ``rank``'s micro-batch ``micro`` of ``step``: rows of a batch made for all."""
    x = torch.randn(MICRO * world, 8, generator=torch.Generator().manual_seed(100 * step + micro))
    rows = x[rank * MICRO:(rank + 1) * MICRO]
    return rows, (rows[:, :4].argmax(1) + step) % 4


def reference(tied: bool, dp: int, clip: float = 0.0) -> tuple[list[float], list[float]]:
    """The same layers (seeded as seed_layers does) in one process, on whole batches, torch AdamW."""
    built: list[nn.Module] = []
    for i, spec in enumerate(layers(tied)):
        torch.manual_seed(SEED + i)
        built.append(built[0] if tied and i == 3 else spec.build())

    def forward(x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(built):
            x = transposed(layer, x) if tied and i == 3 else layer(x)
        return x

    params = list({id(p): p for m in built for p in m.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    losses, norms = [], []
    for step in range(STEPS):
        total = 0.0
        for micro in range(ACCUM):
            x, y = (torch.cat(t) for t in zip(*(micro_batch(step, micro, r, dp) for r in range(dp))))
            loss = F.cross_entropy(forward(x), y) / ACCUM
            loss.backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))))
        opt.step()
        opt.zero_grad()
        losses.append(total)
    assert not clip or max(norms) > clip, f"the test's clip must bite: {norms}"
    return losses, norms


def config(stage: int, **extra: object) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}}, **extra}


def pipeline_script(stages: int, stage: int, tied: bool, root: str | None = None, resume: bool = False,
                    norm: bool = False, clip: float = 0.0, fp16: bool = False) -> dict:
    """DeepSpeed's pipeline loop: build the PipelineModule, initialize, train_batch per step."""
    model = PipelineModule(layers(tied, norm), num_stages=stages, loss_fn=F.cross_entropy, seed_layers=True,
                           base_seed=SEED, partition_method="uniform")
    extra = {"fp16": {"enabled": True, "initial_scale_power": 8}} if fp16 else {}
    engine, _, _, _ = deepspeed.initialize(model=model, config=config(stage, gradient_clipping=clip, **extra))

    def batch(step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        made = [micro_batch(step, m, engine.mesh.dp.rank, engine.mesh.dp.world_size) for m in range(ACCUM)]
        return iter([(x.half() if fp16 else x, y) for x, y in made])

    first = 0
    if resume:
        assert root is not None
        _, client = engine.load_checkpoint(Path(root))
        first = client["step"]
    losses, norms = [], []
    for step in range(first, STEPS):
        losses.append(engine.train_batch(batch(step)).item())
        if root is not None and not resume and step == 1:
            engine.save_checkpoint(Path(root), client_state={"step": 2})
        norms.append(engine.get_global_grad_norm())
    evaluated = engine.eval_batch(batch(STEPS)).item()
    return {"losses": losses, "eval": evaluated, "first": engine.is_first_stage(), "last": engine.is_last_stage(),
            "micro_batches": engine.micro_batches, "global_steps": engine.global_steps, "norms": norms,
            "skipped": engine.skipped_steps, "scale": engine.optimizer.loss_scale,
            "counters": (engine._stage.micro_steps, engine.global_samples)}


@pytest.mark.parametrize(("world", "stages", "stage", "tied", "clip"),
                         [(2, 2, 0, False, 0.0), (2, 2, 1, True, 0.0), (4, 2, 1, True, 0.0),
                          (2, 2, 0, True, 0.2), (4, 2, 1, True, 0.2)])
def test_train_batch_matches_plain_torch(world: int, stages: int, stage: int, tied: bool, clip: float):
    """``clip``: gradient clipping by the norm over every stage (a tied layer counted once)."""
    dp = world // stages
    want, want_norms = reference(tied, dp, clip)
    results = run_ranks(pipeline_script, world, stages, stage, tied, None, False, False, clip, timeout=240)
    for rank, got in enumerate(results):
        err = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], want, strict=True))
        assert err <= 1e-5, f"rank {rank}: {got['losses']} vs {want}"
        assert got["micro_batches"] == ACCUM and got["global_steps"] == STEPS
        assert (got["first"], got["last"]) == (rank // dp == 0, rank // dp == stages - 1)
    assert len({r["eval"] for r in results}) == 1  # one loss, told to every rank
    for got in results:  # the norm of the whole model (each tied layer once), on every stage
        assert max(abs(a - b) / b for a, b in zip(got["norms"], want_norms, strict=True)) <= 1e-5, got["norms"]


def test_fp16_pipeline_follows_plain_torch():
    """fp16 weights and activations, the loss scaled on the last stage and unscaled by every stage's
    optimizer (all moving the scale together): within fp16's precision of the fp32 loop."""
    want, _ = reference(True, 1, 0.2)
    results = run_ranks(pipeline_script, 2, 2, 1, True, None, False, False, 0.2, True, timeout=240)
    for rank, got in enumerate(results):
        err = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], want, strict=True))
        assert err <= 3e-2 and got["skipped"] == 0 and got["scale"] == 256.0, (rank, got, want)


def test_checkpoint_resumes_exactly(tmp_path: Path):
    straight = run_ranks(pipeline_script, 2, 2, 1, True, str(tmp_path), False, True, timeout=240)[0]
    resumed = run_ranks(pipeline_script, 2, 2, 1, True, str(tmp_path), True, True, timeout=240)[0]
    assert resumed["losses"] == straight["losses"][2:]
    assert resumed["eval"] == straight["eval"] and resumed["global_steps"] == STEPS
    assert resumed["counters"] == straight["counters"]  # the one checkpoint writer keeps every counter


@pytest.mark.parametrize(("extra", "match"), [
    ({"zero_optimization": {"stage": 2}}, r"zero_optimization.stage: pipeline parallelism runs with ZeRO stage 0 or 1"),
    ({"pipeline": {"partition": "parameters"}}, "pipeline.partition: the config asks 'parameters'"),
    ({"pipeline": {"stages": 3}}, "pipeline.stages: the config says 3"),
])
def test_configs_the_pipeline_cannot_run_are_refused(extra: dict, match: str):
    model = PipelineModule(layers(False), num_stages=1, loss_fn=F.cross_entropy, partition_method="uniform")
    with pytest.raises(deepspeed.ConfigError, match=match):
        deepspeed.initialize(model=model, config={**config(0), **extra})


def test_pipeline_refusals_name_what_is_unsupported():
    with pytest.raises(NotImplementedError, match="topology"):
        PipelineModule(layers(False), topology=object())
    with pytest.raises(NotImplementedError, match="seed_fn"):
        PipelineModule(layers(False), num_stages=1, seed_fn=torch.manual_seed)
    with pytest.raises(ValueError, match="tied_weight_attr"):
        TiedLayerSpec("t", nn.Linear, 2, 2, tied_weight_attr="weight").build()  # its bias would stay untied
    model = PipelineModule(layers(False), num_stages=1, loss_fn=F.cross_entropy)
    engine, _, _, _ = deepspeed.initialize(model=model, config=config(1))
    with pytest.raises(RuntimeError, match="train_batch"):
        engine(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="data_iter"):
        engine.train_batch()


def scheduled_from_training_data() -> dict:
    """initialize(training_data=...) and a config scheduler: train_batch() reads the loader (across epochs)
    and the LR schedule steps once per batch."""
    xs = torch.randn(2 * MICRO * ACCUM - MICRO, 8, generator=torch.Generator().manual_seed(0))  # 1.5 batches
    data = torch.utils.data.TensorDataset(xs, xs[:, :4].argmax(1))
    warmup = {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 3}
    model = PipelineModule(layers(False), num_stages=2, loss_fn=F.cross_entropy, partition_method="uniform")
    engine, _, loader, scheduler = deepspeed.initialize(
        model=model, training_data=data,
        config=config(0, scheduler={"type": "WarmupLR", "params": warmup}))
    lrs = []
    for _ in range(STEPS):
        engine.train_batch()
        lrs.append(engine.get_lr()[0])
    return {"lrs": lrs, "loader": loader is not None, "scheduler": scheduler is engine.lr_scheduler}


def test_training_data_and_the_lr_schedule_reach_the_pipeline():
    want = []
    reference = deepspeed.WarmupLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR), warmup_min_lr=0.0,
                                   warmup_max_lr=LR, warmup_num_steps=3)
    for _ in range(STEPS):
        reference.step()
        want.append(reference.get_last_lr()[0])
    for got in run_ranks(scheduled_from_training_data, 2, timeout=240):
        assert got["loader"] and got["scheduler"]
        assert got["lrs"] == pytest.approx(want)


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x + 0 * w

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.full((), float("inf"))


class Spiky(nn.Module):
    """Passes its input through; while ``spike`` is set its own weight's gradient is inf (nothing else
    is touched: the other stage's gradients stay finite)."""

    spike = False

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _InfGrad.apply(x, self.w) if Spiky.spike else x + 0 * self.w


def skip_together(fp16: bool) -> dict:
    specs = [LayerSpec(nn.Linear, 8, 8), LayerSpec(nn.Tanh), LayerSpec(nn.Linear, 8, 8), LayerSpec(Spiky),
             LayerSpec(nn.Linear, 8, 4)]
    model = PipelineModule(specs, num_stages=2, loss_fn=F.cross_entropy, partition_method="uniform")
    extra = {"fp16": {"enabled": True, "initial_scale_power": 10, "hysteresis": 1}} if fp16 else {}
    engine, _, _, _ = deepspeed.initialize(model=model, config=config(1, **extra))
    dp_rank, dp = engine.mesh.dp.rank, engine.mesh.dp.world_size
    kept, scales, applied = False, [], []
    for step in range(3):
        Spiky.spike = step == 1
        before = [p.detach().clone() for p in engine.module.parameters()]
        batches = [micro_batch(step, m, dp_rank, dp) for m in range(ACCUM)]
        engine.train_batch(iter([(x.half() if fp16 else x, y) for x, y in batches]))
        if step == 1:
            kept = all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters(), strict=True))
        scales.append(engine.optimizer.loss_scale)
        applied.append(engine.was_step_applied())
    return {"spiky_here": any(isinstance(m, Spiky) for m in engine.module.modules()), "kept": kept,
            "skipped": engine.skipped_steps, "global_steps": engine.global_steps, "scales": scales,
            "applied": applied, "samples": engine.global_samples, "clipping": engine.gradient_clipping(),
            "mom": engine.get_mom(), "monitor": engine.monitor is not None}


@pytest.mark.parametrize(("world", "fp16"), [(2, False), (4, False), (2, True)])
def test_a_step_with_an_inf_gradient_on_one_stage_is_skipped_on_every_stage(world: int, fp16: bool):
    results = run_ranks(skip_together, world, fp16, timeout=240)
    assert any(r["spiky_here"] for r in results) and not all(r["spiky_here"] for r in results)
    for rank, r in enumerate(results):
        assert r["kept"] and r["skipped"] == 1 and r["global_steps"] == 3, (rank, r)
        assert r["applied"] == [True, False, True] and r["samples"] == 3 * MICRO * ACCUM * (world // 2), (rank, r)
        assert r["clipping"] == 0.0 and r["mom"] == [(0.9, 0.999)] and r["monitor"], (rank, r)
        # fp16: every stage halves its loss scale at the overflow, so all keep scaling alike
        assert r["scales"] == ([1024.0, 512.0, 512.0] if fp16 else [1.0] * 3), (rank, r)


def stage_without_parameters() -> None:
    specs = [LayerSpec(nn.Linear, 8, 8), LayerSpec(nn.Tanh), LayerSpec(nn.Tanh), LayerSpec(nn.Tanh)]
    model = PipelineModule(specs, num_stages=2, loss_fn=F.cross_entropy, partition_method="uniform")
    deepspeed.initialize(model=model, config=config(0))


def test_a_stage_with_nothing_to_train_is_named():
    with pytest.raises(RankFailure, match=r"stage 1 \(layers 2-3\) of 2 has no parameter to train"):
        run_ranks(stage_without_parameters, 2, timeout=120)
