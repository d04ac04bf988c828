"""The DeepSpeed config: a user's ds_config.json loads as written, and anything that cannot run as
written is one line naming the key -- never silently ignored."""

import json
from pathlib import Path

import pytest

from zero_all import ConfigError, DeepSpeedConfig, load_config

# the shape Hugging Face's integration writes, "auto" values and 1e9-style integers included
HF_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True},
        "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4, "wall_clock_breakdown": False,
}


def test_a_hugging_face_zero3_config_loads_and_resolves():
    config = load_config(HF_ZERO3).resolve(world_size=2, hidden_size=1024)
    zero = config.zero_optimization
    assert (config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps, config.train_batch_size) == \
        (4, 1, 8)
    assert zero.stage == 3 and zero.sub_group_size == 1_000_000_000 and isinstance(zero.sub_group_size, int)
    assert zero.reduce_bucket_size == 1024 * 1024
    assert zero.stage3_prefetch_bucket_size == int(0.9 * 1024 * 1024)
    assert zero.stage3_param_persistence_threshold == 10 * 1024
    assert zero.offload_param is not None and zero.offload_param.device == "nvme"
    # "auto" that no Trainer filled takes the Trainer's defaults: max_grad_norm 1.0, fp16 off
    assert config.gradient_clipping == 1.0 and config.fp16.enabled is False


def test_auto_batch_sizes_and_never_printing_as_hugging_face_writes_them():
    config = load_config({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                          "steps_per_print": float("inf")}).resolve(world_size=2)
    assert (config.train_micro_batch_size_per_gpu, config.train_batch_size) == (8, 16)  # per_device_train_batch_size
    assert config.steps_per_print == 0  # Accelerate's inf: never


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
def test_the_same_config_from_json_yaml_and_toml(tmp_path: Path, suffix: str):
    raw = {"train_batch_size": 32, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
           "bf16": {"enabled": True}, "gradient_clipping": 1.0}
    path = tmp_path / f"ds_config{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(raw))
    elif suffix == ".yaml":
        path.write_text("train_batch_size: 32\ngradient_accumulation_steps: 2\nzero_optimization:\n  stage: 2\n"
                        "bf16:\n  enabled: true\ngradient_clipping: 1.0\n")
    else:
        path.write_text("train_batch_size = 32\ngradient_accumulation_steps = 2\ngradient_clipping = 1.0\n"
                        "[zero_optimization]\nstage = 2\n[bf16]\nenabled = true\n")
    assert load_config(path) == load_config(raw) == load_config(json.dumps(raw))
    assert load_config(path).resolve(4).train_micro_batch_size_per_gpu == 4


@pytest.mark.parametrize(("given", "world", "want"), [
    ({"train_batch_size": 64}, 4, (16, 1, 64)),
    ({"train_batch_size": 64, "gradient_accumulation_steps": 4}, 4, (4, 4, 64)),
    ({"train_micro_batch_size_per_gpu": 2}, 4, (2, 1, 8)),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 2, (2, 3, 12)),
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 3}, 2, (3, 4, 24)),
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 4}, 2, (3, 4, 24)),
])
def test_the_batch_size_triangle_is_completed(given: dict, world: int, want: tuple):
    c = load_config(given).resolve(world)
    assert (c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps, c.train_batch_size) == want


@pytest.mark.parametrize(("raw", "message"), [
    ({"zero_optimization": {"stage3_prefetch_bucket_sze": 1}},
     "zero_optimization.stage3_prefetch_bucket_sze: unknown key in zero_optimization; did you mean "
     "'stage3_prefetch_bucket_size'?"),
    ({"train_batch_sise": 8}, "train_batch_sise: unknown key; did you mean 'train_batch_size'?"),
    ({"optimizer": {"type": "AdamW", "parms": {}}},
     "optimizer.parms: unknown key in optimizer; did you mean 'params'?"),
    ({"zero_optimization": {"stage": "three"}}, 'zero_optimization.stage: expected one of 0, 1, 2, 3, got "three"'),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage: expected one of 0, 1, 2, 3, got 4"),
    ({"fp16": {"enabled": "yes"}}, 'fp16.enabled: expected one of true, false, "auto", got "yes"'),
    ({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}},
     'zero_optimization.offload_optimizer.device: expected one of "none", "cpu", "nvme", got "gpu"'),
    ({"zero_optimization": {"sub_group_size": 1.5}}, "zero_optimization.sub_group_size: expected an integer, got 1.5"),
    ({"gradient_clipping": "1.0"}, 'gradient_clipping: expected "auto" or a number, got "1.0"'),
    ({"train_batch_size": [8]}, 'train_batch_size: expected "auto" or an integer or null, got [8]'),
    ({"flops_profiler": {"enabled": True}},
     'flops_profiler: zero does not have the flops profiler yet; remove the block or set "enabled": false'),
    ({"checkpoint": {"load_universal": True}},
     "checkpoint.load_universal: zero does not have universal checkpoints (its checkpoints reshard to any world "
     "size) yet (leave it at false)"),
    ({"prescale_gradients": True},
     "prescale_gradients: zero does not have gradient pre-scaling yet (leave it at false)"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "ratio": 0.3}}},
     "zero_optimization.offload_param.ratio: zero does not have partial parameter offload yet (leave it at 1.0)"),
    ({"communication_data_type": "bf16"}, "communication_data_type: zero does not have reduced-precision gradient "
                                          'communication yet (leave it at null or "fp32")'),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled: fp16 and bf16 cannot both be enabled"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     "zero_optimization.offload_param: parameters are offloaded only in stage 3, this config has stage 2"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
     "zero_optimization.offload_param.device 'cpu' needs offload_optimizer.device 'cpu' too"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
     "zero_optimization.offload_param.nvme_path: device 'nvme' needs an nvme_path"),
])
def test_a_config_that_cannot_run_as_written_is_one_line_naming_the_key(raw: dict, message: str):
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize(("raw", "world", "message"), [
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 3}, 2,
     "train_batch_size: 10 is not a multiple of train_micro_batch_size_per_gpu 3 * data-parallel world size 2"),
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}, 2,
     "train_batch_size: 16 != train_micro_batch_size_per_gpu 2 * gradient_accumulation_steps 2 * data-parallel "
     "world size 2 (= 8)"),
    ({"gradient_accumulation_steps": 2}, 2, "train_batch_size: set train_batch_size or train_micro_batch_size_per_gpu"),
])
def test_inconsistent_batch_sizes_are_refused(raw: dict, world: int, message: str):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        load_config(raw).resolve(world)


def test_a_disabled_block_of_a_missing_feature_is_accepted_and_files_are_checked(tmp_path: Path):
    assert isinstance(load_config({"flops_profiler": {"enabled": False}, "train_batch_size": 8}), DeepSpeedConfig)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"train_batch_size\": 8,")
    with pytest.raises(ConfigError, match="cannot be parsed as json"):
        load_config(bad)


@pytest.mark.parametrize("key, value", [("train_micro_batch_size_per_gpu", 0), ("train_micro_batch_size_per_gpu", -1),
                                        ("train_batch_size", -8), ("gradient_accumulation_steps", 0)])
def test_batch_sizes_below_one_are_refused_naming_the_key_and_value(key: str, value: int):
    raw = {"train_micro_batch_size_per_gpu": 2, key: value}
    with pytest.raises(ConfigError, match=rf"^{key}: must be a positive integer .*got {value}$"):
        load_config(raw)
