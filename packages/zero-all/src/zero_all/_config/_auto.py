"""``"auto"`` values a config still holds when no Hugging Face Trainer filled them in.

``"auto"`` is Hugging Face's: its Trainer (and Accelerate) replace each one with the value of a
``TrainingArguments`` field before DeepSpeed sees the config. A config written for the Trainer but run
without it (``zero run`` on a plain script, or Accelerate leaving a key untouched) therefore gets what
the Trainer would have written with its own defaults, so the same file means the same training either
way: ``gradient_clipping`` is ``max_grad_norm`` (1.0, not off), the optimizer's learning rate is 5e-5,
and so on. A value with no Trainer default (``total_num_steps`` is ``max_steps``) is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._error import ConfigError

__all__ = ["TRAINER_DEFAULTS", "fill_optimizer_auto", "fill_scheduler_auto"]

# TrainingArguments' defaults, by the ds_config key the Trainer fills from them
TRAINER_DEFAULTS: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 8,  # per_device_train_batch_size
    "gradient_accumulation_steps": 1,  # gradient_accumulation_steps
    "gradient_clipping": 1.0,  # max_grad_norm
    "fp16.enabled": False,  # fp16
    "bf16.enabled": False,  # bf16
    "optimizer.params.lr": 5e-5,  # learning_rate
    "optimizer.params.betas": (0.9, 0.999),  # adam_beta1, adam_beta2
    "optimizer.params.eps": 1e-8,  # adam_epsilon
    "optimizer.params.weight_decay": 0.0,  # weight_decay
    "scheduler.params.warmup_min_lr": 0.0,
    "scheduler.params.warmup_num_steps": 0,  # warmup_steps
}
_NO_DEFAULT = {"total_num_steps": "max_steps"}


def _fill(block: str, params: Mapping[str, Any], lr: float) -> dict[str, Any]:
    out = dict(params)
    for key, value in params.items():
        if value != "auto":
            continue
        if key in _NO_DEFAULT:
            raise ConfigError(f"{block}.params.{key}: \"auto\" is filled in by Hugging Face's Trainer from "
                              f"{_NO_DEFAULT[key]}, which has no default; outside the Trainer, give a value")
        if block == "scheduler" and key in ("warmup_max_lr", "lr", "max_lr"):
            out[key] = lr
            continue
        path = f"{block}.params.{key}"
        if path not in TRAINER_DEFAULTS:
            raise ConfigError(f"{path}: \"auto\" has no Hugging Face Trainer default here; give a value")
        out[key] = TRAINER_DEFAULTS[path]
    return out


def fill_optimizer_auto(params: Mapping[str, Any]) -> dict[str, Any]:
    """``optimizer.params`` with each ``"auto"`` replaced by the Trainer's default."""
    return _fill("optimizer", params, lr=0.0)


def fill_scheduler_auto(params: Mapping[str, Any], optimizer_lr: float | None) -> dict[str, Any]:
    """``scheduler.params`` with each ``"auto"`` replaced as the Trainer would (the peak learning rate is the
    optimizer's, else the Trainer's default 5e-5)."""
    lr = TRAINER_DEFAULTS["optimizer.params.lr"] if optimizer_lr is None else optimizer_lr
    return _fill("scheduler", params, lr=lr)
