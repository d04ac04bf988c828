"""DeepSpeed's learning-rate schedules, and the scheduler a config or a client asks for.

The five schedules of DeepSpeed's ``lr_schedules`` module, with its parameter names,
defaults and formulas, so a ``"scheduler"`` block moves over unchanged:

- :class:`WarmupLR`: from ``warmup_min_lr`` up to ``warmup_max_lr`` over
  ``warmup_num_steps`` (``"log"``: ``log(k + 1) / log(n)`` of the way at step ``k``;
  ``"linear"``: ``k / n``), then flat.
- :class:`WarmupDecayLR`: the same warmup, then linearly down to 0 at ``total_num_steps``.
- :class:`WarmupCosineLR`: a ratio of the optimizer's own learning rate, warmed up from
  ``warmup_min_ratio`` to 1, then a half cosine down to ``cos_min_ratio`` at
  ``total_num_steps``.
- :class:`OneCycle`: one triangle cycle from ``cycle_min_lr`` to ``cycle_max_lr`` and back
  (optionally in stairs), then an inverse-time decay; momentum (``betas[0]``) cycles the
  other way.
- :class:`LRRangeTest`: a learning rate growing linearly (or in stairs) from
  ``lr_range_test_min_lr``, to find where training diverges.

A schedule acts on anything with ``param_groups`` (a list of dicts with ``"lr"``): a
torch optimizer, a ZeRO optimizer, the engine's ``basic_optimizer``. ``step()`` is
called once per optimizer step; ``last_batch_iteration`` counts those steps (-1 before
the first), and ``state_dict()`` is just that counter, as in DeepSpeed.

:func:`build_scheduler` turns a config's ``scheduler`` block into one of these or into
any ``torch.optim.lr_scheduler`` class named there, refusing an unknown type or
parameter with the nearest valid name.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .._config import ConfigError, fill_scheduler_auto
from ..utils import log_dist

__all__ = ["SCHEDULES", "LRRangeTest", "OneCycle", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR", "build_scheduler"]



class HasParamGroups(Protocol):
    @property
    def param_groups(self) -> list[dict[str, Any]]: ...


Floats = float | Sequence[float]


class _Schedule:
    """What every schedule shares: the step counter, writing the learning rates, the state dict."""

    def __init__(self, optimizer: HasParamGroups, last_batch_iteration: int) -> None:
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"a schedule needs an optimizer with param_groups, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.last_batch_iteration = last_batch_iteration
        self._last_lr: list[float] | None = None

    def _per_group(self, value: Floats, name: str) -> list[float]:
        """A number for every group: one broadcast to all, or a list with one per group."""
        n = len(self.optimizer.param_groups)
        values: list[Any] = list(value) if isinstance(value, (list, tuple)) else [value] * n
        if len(values) != n:
            raise ValueError(f"{name}: expected one value per parameter group ({n}), got {len(values)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{name}: expected a number or a list of numbers, got {value!r}")
        return [float(v) for v in values]

    def _start(self) -> None:
        """A fresh schedule (``last_batch_iteration == -1``) sets its starting rates at once, as DeepSpeed's do."""
        if self.last_batch_iteration == -1:
            self._apply()

    def _apply(self) -> None:
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        """The learning rate of every group at ``last_batch_iteration``."""
        raise NotImplementedError

    def get_last_lr(self) -> list[float]:
        """The learning rates the last ``step`` (or a fresh start) wrote."""
        if self._last_lr is None:
            raise RuntimeError(f"{type(self).__name__}.get_last_lr: call step() first (this schedule resumed at "
                               f"last_batch_iteration={self.last_batch_iteration} and has not stepped yet)")
        return self._last_lr

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advance to the next optimizer step (or to ``last_batch_iteration``) and write its rates."""
        self.last_batch_iteration = self.last_batch_iteration + 1 if last_batch_iteration is None \
            else last_batch_iteration
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved step; the learning rates themselves come back with the optimizer's state."""
        self.last_batch_iteration = int(state["last_batch_iteration"])
        self._last_lr = self.get_lr()


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, float) and value.is_integer():  # JSON configs write 1e5
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return value


def _warmup_type(value: Any) -> str:
    if value not in ("log", "linear"):
        raise ValueError(f"warmup_type: must be 'log' or 'linear', got {value!r}")
    return str(value)


def _warmup_fraction(k: int, steps: int, kind: str) -> float:
    """How far through the warmup step ``k`` is: ``log(k + 1) / log(n)`` or ``k / n``."""
    return (1.0 / math.log(steps)) * math.log(k + 1) if kind == "log" else k / steps  # DeepSpeed's rounding


class WarmupLR(_Schedule):
    """``warmup_min_lr`` rising to ``warmup_max_lr`` over ``warmup_num_steps``, then constant.

    At step ``k < n`` the rate is ``min + (max - min) * f(k)`` with ``f(k) = log(k + 1) / log(n)``
    (``warmup_type="log"``) or ``k / n`` (``"linear"``); ``n`` is at least 2. ``warmup_max_lr``
    defaults to each group's current learning rate. Either bound may be a list, one per group.
    """

    def __init__(self, optimizer: HasParamGroups, warmup_min_lr: Floats = 0.0, warmup_max_lr: Floats | None = None,
                 warmup_num_steps: int = 1000, warmup_type: str = "log", last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        steps = _positive_int(warmup_num_steps, "warmup_num_steps")
        self.warmup_type = _warmup_type(warmup_type)
        if warmup_max_lr is None:
            warmup_max_lr = [float(g["lr"]) for g in optimizer.param_groups]
        self.min_lrs = self._per_group(warmup_min_lr, "warmup_min_lr")
        self.max_lrs = self._per_group(warmup_max_lr, "warmup_max_lr")
        self.warmup_num_steps = max(2, steps)
        self._start()

    def _gamma(self) -> float:
        """The fraction of the way from the minimum to the maximum rate."""
        k = self.last_batch_iteration
        return _warmup_fraction(k, self.warmup_num_steps, self.warmup_type) if k < self.warmup_num_steps else 1.0

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma()
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, self.max_lrs, strict=True)]


class WarmupDecayLR(WarmupLR):
    """:class:`WarmupLR`'s warmup, then a linear decay reaching 0 at ``total_num_steps``:
    ``max * (T - k) / (T - n)`` past the warmup (never below 0)."""

    def __init__(self, optimizer: HasParamGroups, total_num_steps: int, warmup_min_lr: Floats = 0.0,
                 warmup_max_lr: Floats = 0.001, warmup_num_steps: int = 1000, warmup_type: str = "log",
                 last_batch_iteration: int = -1) -> None:
        self.total_num_steps = _positive_int(total_num_steps, "total_num_steps")
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        if self.total_num_steps < self.warmup_num_steps:
            log_dist(f"WarmupDecayLR: total_num_steps {self.total_num_steps} is less than warmup_num_steps "
                     f"{self.warmup_num_steps}", ranks=[0], level=logging.WARNING)

    def _gamma(self) -> float:
        k = self.last_batch_iteration
        if k < self.warmup_num_steps:
            return _warmup_fraction(k, self.warmup_num_steps, self.warmup_type)
        return max(0.0, (self.total_num_steps - k) / max(1.0, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(_Schedule):
    """Each group's learning rate times a ratio: warmed up from ``warmup_min_ratio`` to 1 over
    ``warmup_num_steps`` (log or linear, as :class:`WarmupLR`), then
    ``cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * p)) / 2`` with ``p`` going from 0 to 1
    over the remaining steps to ``total_num_steps`` and staying at 1 after.

    The base rates are the groups' rates when the schedule is built; a fresh schedule starts
    them at 0 (DeepSpeed's ratio before the first step)."""

    def __init__(self, optimizer: HasParamGroups, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = "log",
                 last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        self.total_num_steps = _positive_int(total_num_steps, "total_num_steps")
        self.warmup_num_steps = max(2, _positive_int(warmup_num_steps, "warmup_num_steps"))
        self.warmup_type = _warmup_type(warmup_type)
        self.warmup_min_ratio, self.cos_min_ratio = float(warmup_min_ratio), float(cos_min_ratio)
        if self.total_num_steps < self.warmup_num_steps:
            log_dist(f"WarmupCosineLR: total_num_steps {self.total_num_steps} is less than warmup_num_steps "
                     f"{self.warmup_num_steps}", ranks=[0], level=logging.WARNING)
        self.org_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self._start()

    def get_lr_ratio(self) -> float:
        k = self.last_batch_iteration
        if k < 0:
            return 0.0
        if k < self.warmup_num_steps:
            rise = _warmup_fraction(k, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + rise * (1.0 - self.warmup_min_ratio)
        progress = min(1.0, (k - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps))
        cosine = (1.0 + math.cos(math.pi * progress)) / 2.0
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float]:
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.org_lrs]


class OneCycle(_Schedule):
    """One cycle of the learning rate up and back down, then a decay (Smith's 1cycle policy).

    Within the cycle (``cycle_first_step_size`` steps up, ``cycle_second_step_size`` down,
    default the same) the rate is ``cycle_min_lr + (cycle_max_lr - cycle_min_lr) * s`` with
    ``s`` rising 0 -> 1 -> 0; with ``cycle_*_stair_count`` > 0, ``s`` moves in that many
    stairs per half. After the cycle the rate is ``cycle_min_lr / (1 + decay_lr_rate * d /
    decay_step_size)`` ``d`` steps past its end (no decay where either is 0).

    With ``cycle_momentum`` and an optimizer that has ``betas``, ``betas[0]`` moves the other
    way between ``cycle_max_mom`` and ``cycle_min_mom`` (and grows by ``decay_mom_rate`` after
    the cycle); as in DeepSpeed, ``betas[1]`` is set to 0.99 while it does.
    """

    def __init__(self, optimizer: HasParamGroups, cycle_min_lr: Floats, cycle_max_lr: Floats,
                 decay_lr_rate: float = 0.0, cycle_first_step_size: int = 2000,
                 cycle_second_step_size: int | None = None, cycle_first_stair_count: int = 0,
                 cycle_second_stair_count: int | None = None, decay_step_size: int = 0, cycle_momentum: bool = True,
                 cycle_min_mom: Floats = 0.8, cycle_max_mom: Floats = 0.9, decay_mom_rate: float = 0.0,
                 last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        first = float(cycle_first_step_size)
        second = first if cycle_second_step_size is None else float(cycle_second_step_size)
        if first <= 0:
            raise ValueError(f"cycle_first_step_size: must be positive, got {cycle_first_step_size!r}")
        if second < 0:
            raise ValueError(f"cycle_second_step_size: must be >= 0, got {cycle_second_step_size!r}")
        self.first_step_size, self.second_step_size = first, second
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = int(cycle_first_stair_count)
        self.second_stair_count = self.first_stair_count if cycle_second_stair_count is None \
            else int(cycle_second_stair_count)
        self.decay_step_size = float(decay_step_size)
        self.min_lrs = self._per_group(cycle_min_lr, "cycle_min_lr")
        self.max_lrs = self._per_group(cycle_max_lr, "cycle_max_lr")
        self.decay_lr_rate, self.decay_mom_rate = float(decay_lr_rate), float(decay_mom_rate)
        no_decay = math.isclose(self.decay_step_size, 0.0)
        self.skip_lr_decay = no_decay or math.isclose(self.decay_lr_rate, 0.0)
        self.skip_mom_decay = no_decay or math.isclose(self.decay_mom_rate, 0.0)
        defaults = getattr(optimizer, "defaults", None) or optimizer.param_groups[0]
        self.cycle_momentum = bool(cycle_momentum) and "betas" in defaults
        if cycle_momentum and not self.cycle_momentum:
            log_dist(f"OneCycle: cycle_momentum is off: {type(optimizer).__name__} has no betas", ranks=[0],
                     level=logging.WARNING)
        self.min_moms = [(m, 0.99) for m in self._per_group(cycle_min_mom, "cycle_min_mom")]
        self.max_moms = [(m, 0.99) for m in self._per_group(cycle_max_mom, "cycle_max_mom")]
        if last_batch_iteration == -1:
            self._apply()
            if self.cycle_momentum:
                for group, betas in zip(optimizer.param_groups, self.min_moms, strict=True):
                    group["betas"] = betas

    def _scale(self) -> float:
        """Where in the cycle the next batch is: 0 at the bottom, 1 at the top."""
        batch = self.last_batch_iteration + 1
        cycle = math.floor(1 + batch / self.total_size)
        x = 1.0 + batch / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:  # held flat across each stair, counted from the integer position in the cycle
            at = batch % self.total_size
            position = at * stairs / self.first_step_size if at <= self.first_step_size \
                else (self.total_size - at) * stairs / self.second_step_size
            scale = math.floor(position) / stairs
        return scale

    def _decay_steps(self) -> float:
        return self.last_batch_iteration - self.total_size + 1

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < self.total_size:
            scale = self._scale()
            return [lo + (hi - lo) * scale for lo, hi in zip(self.min_lrs, self.max_lrs, strict=True)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        factor = 1.0 + self.decay_lr_rate * (self._decay_steps() / self.decay_step_size)
        return [lo / factor for lo in self.min_lrs]

    def get_mom(self) -> list[tuple[float, float]] | None:
        """Each group's ``betas`` at ``last_batch_iteration`` (None without momentum cycling)."""
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < self.total_size:
            scale = self._scale()
            return [(hi - (hi - lo) * scale, b2) for (lo, b2), (hi, _) in zip(self.min_moms, self.max_moms,
                                                                              strict=True)]
        if self.skip_mom_decay:
            return list(self.max_moms)
        factor = 1.0 + self.decay_mom_rate * (self._decay_steps() / self.decay_step_size)
        return [(hi * factor, b2) for hi, b2 in self.max_moms]

    def step(self, last_batch_iteration: int | None = None) -> None:
        super().step(last_batch_iteration)
        for group, betas in zip(self.optimizer.param_groups, self.get_mom() or [], strict=False):
            group["betas"] = betas


class LRRangeTest(_Schedule):
    """``lr_range_test_min_lr * (1 + lr_range_test_step_rate * i)`` with ``i = (k + 1) / step_size``
    (or its floor, with ``lr_range_test_staircase``): a steadily growing rate, to find the
    largest that still trains."""

    def __init__(self, optimizer: HasParamGroups, lr_range_test_min_lr: Floats = 1e-3,
                 lr_range_test_step_size: int = 2000, lr_range_test_step_rate: float = 1.0,
                 lr_range_test_staircase: bool = False, last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        self.min_lrs = self._per_group(lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = _positive_int(lr_range_test_step_size, "lr_range_test_step_size")
        self.step_rate = float(lr_range_test_step_rate)
        self.staircase = bool(lr_range_test_staircase)
        self._start()

    def get_lr(self) -> list[float]:
        interval = (self.last_batch_iteration + 1) / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return [lo * (1.0 + self.step_rate * interval) for lo in self.min_lrs]


SCHEDULES: dict[str, type[_Schedule]] = {
    "WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR,
    "OneCycle": OneCycle, "LRRangeTest": LRRangeTest,
}


def _torch_schedules() -> dict[str, type]:
    module = torch.optim.lr_scheduler
    out = {}
    for name, cls in vars(module).items():
        if name.startswith("_") or not isinstance(cls, type) or cls.__module__ != module.__name__:
            continue
        if issubclass(cls, (module.LRScheduler, module.ReduceLROnPlateau)) and cls is not module.LRScheduler:
            out[name] = cls
    return out


def _nearest(name: str, options: Sequence[str]) -> str:
    by_case = [o for o in options if o.lower() == name.lower()]
    near = by_case or difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""


def build_scheduler(kind: str, params: dict[str, Any], optimizer: Any) -> Any:
    """The schedule a config's ``scheduler`` block names, built on ``optimizer``: one of DeepSpeed's
    (:data:`SCHEDULES`) or a ``torch.optim.lr_scheduler`` class by its name. ``"auto"`` (which
    Hugging Face's Trainer fills in) takes the Trainer's default (:mod:`zero_all._auto`). Raises :class:`ConfigError`
    naming ``scheduler.type`` or ``scheduler.params.<key>``."""
    torch_ones = _torch_schedules()
    cls: Any = SCHEDULES.get(kind) or torch_ones.get(kind)
    if cls is None:
        hint = _nearest(kind, [*SCHEDULES, *torch_ones])
        raise ConfigError(f"scheduler.type: unknown schedule {kind!r}{hint} (DeepSpeed's are "
                          f"{', '.join(SCHEDULES)}; any torch.optim.lr_scheduler class works too)")
    groups = getattr(optimizer, "param_groups", None)
    given = fill_scheduler_auto(params, float(groups[0]["lr"]) if groups else None)
    signature = inspect.signature(cls.__init__)
    accepted = [n for n, p in signature.parameters.items() if n not in ("self", "optimizer")
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in given:
        if key not in accepted:
            hint = _nearest(key, accepted) or f" (it takes {', '.join(accepted)})"
            raise ConfigError(f"scheduler.params.{key}: {kind} has no parameter {key!r}{hint}")
    for key in accepted:
        if signature.parameters[key].default is inspect.Parameter.empty and key not in given:
            raise ConfigError(f"scheduler.params.{key}: {kind} needs it")
    try:
        return cls(optimizer, **given)
    except (TypeError, ValueError) as exc:
        text = str(exc)
        key = text.split(":", 1)[0]
        if key in accepted:  # our schedules name the parameter first
            raise ConfigError(f"scheduler.params.{text}") from None
        raise ConfigError(f"scheduler.params: {kind}: {text}") from None
