"""What DeepSpeed tutorial scripts read and call on the engine beyond forward/backward/step: ranks,
precision and stage queries, the engine as an nn.Module, no_sync and a caller-set accumulation
boundary, the gradient norm, optimizer groups with their parameters, load_checkpoint's options, and
DeepSpeed's helper modules (accelerator, utils, comm's object collectives, zero.register_external_parameter)."""

import logging
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zero_all as deepspeed
import zero_ckpt
from zero_all.accelerator import Accelerator, get_accelerator
from zero_all.pipe import LayerSpec, PipelineModule
from zero_comm.testing import run_ranks

MICRO, LR = 4, 1e-2


class Net(nn.Module):
    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))
        self.extra = nn.Linear(4, 4) if extra else None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return F.cross_entropy(self.extra(out) if self.extra is not None else out, y)


def batch(step: int, micro: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s rows of micro-batch ``micro`` of step ``step`` (the whole batch when ``rank`` is None)."""
    x = torch.randn(MICRO * world, 8, generator=torch.Generator().manual_seed(100 * step + micro))
    y = x[:, :4].argmax(1)
    rows = slice(None) if rank is None else slice(rank * MICRO, (rank + 1) * MICRO)
    return x[rows], y[rows]


def config(stage: int, accum: int = 1, **extra: object) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": accum,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 500,
                                  "stage3_param_persistence_threshold": 10},
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}}, **extra}


def engine_for(stage: int, seed: int = 0, accum: int = 1, model: nn.Module | None = None, **extra: object):
    torch.manual_seed(seed)
    engine, optimizer, _, _ = deepspeed.initialize(model=model or Net(), config=config(stage, accum, **extra))
    return engine, optimizer


def weights(engine) -> dict[str, torch.Tensor]:
    """The model's whole weights (gathered at stage 3)."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


# -- what the engine tells a script ---------------------------------------------------------------------
def describe(stage: int) -> dict:
    engine, optimizer = engine_for(stage, gradient_clipping=0.5)
    rank, world = engine.global_rank, engine.world_size
    assert engine.get_global_grad_norm() is None, "no norm before the first step"
    engine.backward(engine(*batch(0, 0, rank, world)))
    engine.step()
    torch.manual_seed(0)
    whole = Net()  # the plain model on the whole batch: its gradient norm is the engine's
    whole(*batch(0, 0, None, world)).backward()
    want = torch.nn.utils.clip_grad_norm_(whole.parameters(), 0.5).item()
    return {"rank": rank, "world": world, "dp": engine.dp_world_size, "local_rank": engine.local_rank,
            "device": str(engine.device), "stage": engine.zero_optimization_stage(),
            "zero": engine.zero_optimization(), "fp16": engine.fp16_enabled(), "bf16": engine.bfloat16_enabled(),
            "norm": engine.get_global_grad_norm(), "want_norm": want,
            "groups": [[id(p) for p in g["params"]] for g in optimizer.param_groups],
            "params": [id(p) for p in engine.module.parameters()]}


@pytest.mark.parametrize("stage", [0, 3])
def test_the_engine_reports_ranks_precision_stage_and_the_gradient_norm(stage: int):
    results = run_ranks(describe, 2, stage)
    assert [r["rank"] for r in results] == [0, 1] and [r["local_rank"] for r in results] == [0, 1]
    for r in results:
        assert r["world"] == r["dp"] == 2 and r["device"] == "cpu"
        assert (r["stage"], r["zero"], r["fp16"], r["bf16"]) == (stage, stage > 0, False, False)
        assert r["norm"] == pytest.approx(r["want_norm"], rel=1e-5), "the norm over every rank, before clipping"
        assert sorted(p for g in r["groups"] for p in g) == sorted(r["params"]), "each group lists its params"


def module_like() -> dict:
    engine, optimizer = engine_for(1)
    assert isinstance(engine, deepspeed.DeepSpeedEngine) and isinstance(engine, nn.Module)
    assert list(engine.state_dict()) == [f"module.{k}" for k in engine.module.state_dict()], "DeepSpeed's keys"
    assert [id(p) for p in engine.parameters()] == [id(p) for p in engine.module.parameters()]
    assert dict(engine.named_modules())["module"] is engine.module
    assert engine.eval() is engine and not engine.module.training and engine.train().module.training
    seen = []
    engine.register_forward_hook(lambda m, args, out: seen.append(out.item()))
    loss = engine(*batch(0, 0, engine.global_rank, 2))
    assert seen == [loss.item()], "forward hooks on the engine fire"
    engine.zero_grad()
    # a state dict loaded into the engine is what training continues from (the fp32 masters follow it)
    torch.manual_seed(1)
    other = {f"module.{k}": v for k, v in Net().state_dict().items()}
    engine.load_state_dict(other)
    engine.backward(engine(*batch(1, 0, engine.global_rank, 2)))
    engine.step()
    fresh, _ = engine_for(1, seed=1)
    fresh.backward(fresh(*batch(1, 0, fresh.global_rank, 2)))
    fresh.step()
    assert optimizer.loss_scale == 1.0 and engine.loss_scale() == 0.0
    return {"same": same(weights(engine), weights(fresh))}


def test_the_engine_is_an_nn_module_over_the_model_and_loads_state_dicts_into_training():
    assert all(r["same"] for r in run_ranks(module_like, 2))


def fp16() -> tuple[float, float, bool]:
    engine, optimizer = engine_for(0, fp16={"enabled": True, "initial_scale_power": 8})
    return optimizer.loss_scale, engine.loss_scale(), engine.fp16_enabled()


def test_fp16_engines_report_their_loss_scale():
    assert run_ranks(fp16, 1) == [(256.0, 0.0, True)]


# -- accumulation under the script's control -------------------------------------------------------------
def accumulate(stage: int, how: str) -> dict:
    """Two micro-batches into one step: a no_sync block, a caller-set boundary, or the counted default."""
    accum = 2 if how in ("counted", "boundary") else 1
    engine, _ = engine_for(stage, accum=accum)
    rank = engine.global_rank
    if how == "no_sync":
        with engine.no_sync():
            engine.backward(engine(*batch(0, 0, rank, 2)) / 2)
            with pytest.raises(RuntimeError, match="inside no_sync"):
                engine.step()
        engine.backward(engine(*batch(0, 1, rank, 2)) / 2)
        engine.step()
    elif how == "boundary":
        engine.set_gradient_accumulation_boundary(False)
        engine.backward(engine(*batch(0, 0, rank, 2)))
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(engine(*batch(0, 1, rank, 2)))
        engine.step()
    else:
        for micro in range(2):
            engine.backward(engine(*batch(0, micro, rank, 2)))
            engine.step()
    return {"weights": weights(engine), "steps": engine.global_steps}


@pytest.mark.parametrize("stage", [0, 1])
def test_no_sync_and_a_set_boundary_accumulate_like_the_counted_micro_batches(stage: int):
    want = run_ranks(accumulate, 2, stage, "counted")
    for how in ("no_sync", "boundary"):
        got = run_ranks(accumulate, 2, stage, how)
        for mine, theirs in zip(got, want, strict=True):
            assert same(mine["weights"], theirs["weights"]), how
            assert mine["steps"] == 1


def refused(stage: int) -> str:
    engine, _ = engine_for(stage)
    with pytest.raises(RuntimeError, match=f"stage {stage} partitions") as caught, engine.no_sync():
        pass
    return str(caught.value)


@pytest.mark.parametrize("stage", [2, 3])
def test_no_sync_is_refused_where_gradients_are_partitioned(stage: int):
    assert "use stage 0 or 1" in run_ranks(refused, 1, stage)[0]


# -- load_checkpoint's options ----------------------------------------------------------------------------
def train(engine, steps: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        engine.backward(engine(*batch(step, 0, engine.global_rank, 2)))
        engine.step()


def partial_loads(stage: int, root: str) -> dict:
    schedule = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_max_lr": LR}}}
    trained, _ = engine_for(stage, **schedule)
    train(trained, 3)
    trained.save_checkpoint(root, tag="t", client_state={"epoch": 7})
    want = weights(trained)

    # warm start: the weights alone; then a step equals a fresh optimizer's first step from those weights
    warm, warm_opt = engine_for(stage, seed=5, **schedule)
    path, client = warm.load_checkpoint(root, tag="t", load_module_only=True)
    assert path == str(Path(root) / "t") and client == {"epoch": 7}
    loaded = weights(warm)
    assert warm.global_steps == 0 and warm_opt.step_count == 0 and warm.lr_scheduler.last_batch_iteration == -1
    train(warm, 1, first=10)
    torch.manual_seed(0)
    model = Net()
    model.load_state_dict(want)  # the trained weights, as a fresh run's starting point
    fresh, _ = engine_for(stage, model=model, **schedule)
    train(fresh, 1, first=10)

    # the weights, counters and schedule, but a fresh optimizer state
    resumed, resumed_opt = engine_for(stage, seed=6, **schedule)
    resumed.load_checkpoint(root, tag="t", load_optimizer_states=False)
    counters = (resumed.global_steps, resumed_opt.step_count, resumed.lr_scheduler.last_batch_iteration)
    return {"loaded": same(loaded, want), "warm_start": same(weights(warm), weights(fresh)),
            "resumed": same(weights(resumed), want), "counters": counters}


@pytest.mark.parametrize("stage", [1, 3])
def test_load_module_only_and_without_optimizer_states(tmp_path: Path, stage: int):
    for r in run_ranks(partial_loads, 2, stage, str(tmp_path)):
        assert r["loaded"] and r["warm_start"] and r["resumed"]
        assert r["counters"] == (3, 0, 2), "engine counters and the schedule load; the optimizer's step count not"


def non_strict(root: str) -> dict:
    trained, _ = engine_for(1)
    train(trained, 1)
    trained.save_checkpoint(root, tag="t")
    want = weights(trained)
    bigger, _ = engine_for(1, model=Net(extra=True))
    extra_before = bigger.module.extra.weight.detach().clone()
    lacks = r"load_module_strict=True.*checkpoint lacks extra\.bias, extra\.weight"
    with pytest.raises(zero_ckpt.CheckpointError, match=lacks):
        bigger.load_checkpoint(root, tag="t")
    with pytest.raises(zero_ckpt.CheckpointError, match="load_optimizer_states=False"):
        bigger.load_checkpoint(root, tag="t", load_module_strict=False)
    bigger.load_checkpoint(root, tag="t", load_module_strict=False, load_optimizer_states=False)
    got = weights(bigger)
    with pytest.raises(NotImplementedError, match="custom_load_fn"):
        bigger.load_checkpoint(root, tag="t", custom_load_fn=lambda src, dst: None)
    return {"shared": all(torch.equal(got[k], v) for k, v in want.items()),
            "extra_kept": torch.equal(got["extra.weight"], extra_before)}


def test_load_module_strict_false_loads_the_weights_both_have(tmp_path: Path):
    for r in run_ranks(non_strict, 2, str(tmp_path)):
        assert r["shared"] and r["extra_kept"]


def pipeline_partial(root: str) -> dict:
    layers = [LayerSpec(nn.Linear, 8, 16), LayerSpec(nn.Tanh), LayerSpec(nn.Linear, 16, 4)]

    def build() -> deepspeed.PipelineEngine:
        model = PipelineModule(layers, num_stages=2, loss_fn=F.cross_entropy, partition_method="uniform")
        engine, _, _, _ = deepspeed.initialize(model=model, config=config(0, accum=2))
        return engine

    engine = build()
    assert isinstance(engine, nn.Module) and all(k.startswith("module.") for k in engine.state_dict())
    assert engine.dp_world_size == 1 and engine.world_size == 2 and engine.zero_optimization_stage() == 0
    engine.train_batch(iter([batch(0, m, None, 1) for m in range(2)]))
    engine.save_checkpoint(root, tag="t")
    want = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    warm = build()
    warm.load_checkpoint(root, tag="t", load_module_only=True)
    got = {n: p.detach().clone() for n, p in warm.module.named_parameters()}
    return {"same": same(got, want), "steps": warm.global_steps, "opt_steps": warm.optimizer.step_count}


def test_the_pipeline_engine_loads_the_weights_alone(tmp_path: Path):
    for r in run_ranks(pipeline_partial, 2, str(tmp_path)):
        assert r["same"] and r["steps"] == 0 and r["opt_steps"] == 0


def test_a_config_in_args_and_in_the_call_is_refused():
    args = types.SimpleNamespace(deepspeed_config="ds_config.json")
    with pytest.raises(deepspeed.ConfigError, match=r"args\.deepspeed_config"):
        deepspeed.initialize(args=args, model=Net(), config=config(0))


# -- DeepSpeed's helper modules -------------------------------------------------------------------------
def test_get_accelerator_is_this_machines_device():
    acc = get_accelerator()
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    assert acc is get_accelerator() and acc.device_name() == kind and acc.is_available()
    assert acc.communication_backend_name() == ("nccl" if kind == "cuda" else "gloo")
    t = torch.zeros(4, device=acc.current_device_name())
    assert acc.on_accelerator(t) and not Accelerator("cuda" if kind == "cpu" else "cpu").on_accelerator(t)
    assert acc.pin_memory(torch.zeros(2)).shape == (2,) and acc.device_count() >= 1
    assert acc.is_bf16_supported() in (True, False) and acc.is_fp16_supported()
    acc.manual_seed(3)
    first = torch.rand(2, device=acc.device_name())
    acc.manual_seed_all(3)
    assert torch.equal(first, torch.rand(2, device=acc.device_name()))
    acc.synchronize()
    acc.empty_cache()
    assert 0 < acc.memory_allocated() <= acc.max_memory_allocated()
    assert Accelerator("cuda").device_name(1) == "cuda:1" and Accelerator("cpu").device_name(1) == "cpu"
    if kind == "cpu":
        assert acc.Stream is None and acc.Event is None and acc.device() == torch.device("cpu")
    with pytest.raises(ValueError, match="xpu"):
        Accelerator("xpu")


def test_log_dist_logs_in_a_single_process(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="zero_all"):
        deepspeed.utils.log_dist("hello", ranks=[0])
    assert deepspeed.utils.logger is logging.getLogger("zero_all")
    # an earlier test in this process may have started a one-rank process group
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else -1
    assert [r.getMessage() for r in caplog.records] == [f"[Rank {rank}] hello"]


def collectives() -> dict:
    dist = deepspeed.comm
    deepspeed.init_distributed()
    rank = dist.get_rank()
    gathered: list = [None, None]
    dist.all_gather_object(gathered, {"rank": rank})
    sent = [f"from {rank}", rank * 10]
    dist.broadcast_object_list(sent, src=1)
    dist.monitored_barrier()
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    deepspeed.utils.logger.addHandler(handler)
    deepspeed.utils.logger.setLevel(logging.INFO)
    deepspeed.utils.log_dist("only rank 0", ranks=[0])
    deepspeed.utils.log_dist("every rank", ranks=[-1])
    deepspeed.utils.log_dist("nobody: ranks=None with a process group", ranks=None)
    return {"gathered": gathered, "sent": sent, "world": dist.get_world_group() is not None, "logged": logged}


def test_comm_object_collectives_and_log_dist_on_real_ranks():
    results = run_ranks(collectives, 2)
    for rank, r in enumerate(results):
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}] and r["sent"] == ["from 1", 10] and r["world"]
        assert r["logged"] == (["[Rank 0] only rank 0"] if rank == 0 else []) + [f"[Rank {rank}] every rank"]


def test_register_external_parameter_checks_its_arguments():
    layer = nn.Linear(2, 2)
    deepspeed.zero.register_external_parameter(layer, layer.weight)
    deepspeed.zero.unregister_external_parameter(layer, layer.weight)
    with pytest.raises(TypeError, match=r"module must be an nn\.Module"):
        deepspeed.zero.register_external_parameter(layer.weight, layer.weight)
    with pytest.raises(TypeError, match=r"parameter must be an nn\.Parameter"):
        deepspeed.zero.register_external_parameter(layer, torch.zeros(2))
