"""The config's optimizer block builds what DeepSpeed builds: its classes' defaults for omitted keys,
its parameter names, any torch.optim class by name, and one-line errors naming the key."""

from functools import partial

import pytest
import torch
from test_engine import ACCUM, MICRO, STEPS, Net, reference, train_step

import zero_all as deepspeed
import zero_optim
from zero_all._engine._optim import rule_from_config
from zero_comm.testing import run_ranks


def rule(block: dict):
    return rule_from_config(deepspeed.load_config({"train_batch_size": 4, "optimizer": block}))


def test_omitted_keys_take_deepspeeds_defaults_not_torchs():
    # DeepSpeed's FusedAdam / DeepSpeedCPUAdam / FusedLamb / FusedLion decay nothing by default
    assert rule({"type": "AdamW", "params": {"lr": 1e-3}}).defaults["weight_decay"] == 0.0
    assert rule({"type": "Adam", "params": {"adam_w_mode": False}}).defaults["weight_decay"] == 0.0
    lamb = rule({"type": "Lamb", "params": {"max_coeff": 5.0, "min_coeff": 0.1}}).defaults
    assert (lamb["eps"], lamb["weight_decay"], lamb["max_trust"], lamb["min_trust"]) == (1e-8, 0.0, 5.0, 0.1)
    assert rule({"type": "Lion", "params": {}}).defaults == {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0}
    assert rule({"type": "SGD", "params": {"lr": 0.1}}).defaults["momentum"] == 0.0  # torch.optim.SGD's
    # Adam decouples weight decay unless adam_w_mode is false, as in DeepSpeed
    assert rule({"type": "Adam", "params": {}}).name == "AdamW"
    assert rule({"type": "Adam", "params": {"adam_w_mode": False}}).name == "Adam"
    # offloaded or not, the rule is zero-optim's, every hyper-parameter given (DeepSpeedCPUAdam's role: its CPU
    # step is zero-kernels' adam_step on host shards)
    assert rule({"type": "Adam", "params": {"adam_w_mode": False}}) == zero_optim.Adam(weight_decay=0.0)
    assert rule({"type": "AdamW", "params": {}}) == zero_optim.AdamW(weight_decay=0.0)
    # "auto" outside Hugging Face's Trainer: the Trainer's own defaults (learning_rate 5e-5, ...)
    auto = rule({"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}})
    assert auto.defaults == {"lr": 5e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


@pytest.mark.parametrize(("block", "message"), [
    ({"type": "AdamW", "params": {"weight_decy": 0.1}},
     "optimizer.params.weight_decy: AdamW has no parameter 'weight_decy'; did you mean 'weight_decay'?"),
    ({"type": "AdamW", "params": {"lr": "1e-3"}}, "optimizer.params.lr: AdamW takes a finite number >= 0, got '1e-3'"),
    ({"type": "Adam", "params": {"betas": 0.9}},
     "optimizer.params.betas: Adam takes a pair of numbers in [0, 1), got 0.9"),
    ({"type": "AdamW", "params": {"lr": "auto", "foo": "auto"}},
     'optimizer.params.foo: "auto" has no Hugging Face Trainer default here; give a value'),
    ({"type": "AdamW", "params": {"amsgrad": True}},
     "optimizer.params.amsgrad: zero's AdamW runs only with amsgrad=false"),
    ({"type": "AdamW", "params": {"max_grad_norm": 1.0}},
     "optimizer.params.max_grad_norm: clip with the top-level gradient_clipping key instead (as DeepSpeed requires)"),
    ({"type": "Adagard", "params": {}}, "optimizer.type: no optimizer 'Adagard'; did you mean 'Adagrad'?"),
    ({"type": "Lamb", "params": {"max_coeff": -1.0}}, "optimizer.params.max_coeff: Lamb takes a finite number > 0"),
])
def test_a_bad_optimizer_block_is_one_line_naming_the_key(block: dict, message: str):
    with pytest.raises(deepspeed.ConfigError) as info:
        rule(block)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def adagrad_by_name(world: int) -> list[float]:
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "gradient_clipping": 0.5,
              "zero_optimization": {"stage": 2, "reduce_bucket_size": 2000},
              "optimizer": {"type": "Adagrad", "params": {"lr": 0.05, "lr_decay": 0.01}}}
    engine, _, _, _ = deepspeed.initialize(model=Net(), config=config)
    return [train_step(engine, step) for step in range(STEPS)]


def test_any_torch_optimizer_by_name_trains_like_plain_torch():
    want = run_ranks(reference, 1, 2, 0.5, partial(torch.optim.Adagrad, lr=0.05, lr_decay=0.01))[0]
    got = run_ranks(adagrad_by_name, 2, 2)[0]
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True)) <= 1e-5, (got, want)
