"""Dynamic loss scaling for fp16, with DeepSpeed's semantics.

The loss is multiplied by ``scale`` before backward so small fp16 gradients do
not flush to zero. A step whose gradients hold an inf or NaN on any rank is
skipped on every rank. On overflow the scale is halved (never below
``min_scale``) -- unless ``hysteresis`` allows a few overflows first; after
``window`` steps in a row without overflow it doubles again.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DynamicLossScaler", "LossScaleConfig"]


@dataclass(frozen=True)
class LossScaleConfig:
    """DeepSpeed's fp16 block: ``initial_scale_power``, ``loss_scale_window``, ``hysteresis``,
    ``min_loss_scale``; ``static_scale`` > 0 turns dynamic scaling off."""

    initial_scale_power: int = 16
    window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_scale: float = 1.0
    static_scale: float = 0.0

    def __post_init__(self) -> None:
        for name in ("initial_scale_power", "window", "hysteresis"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"LossScaleConfig.{name} must be an integer, got {value!r}")
        if self.window < 1 or self.hysteresis < 1 or self.min_scale <= 0:
            raise ValueError(f"loss scaling needs window >= 1, hysteresis >= 1 and min_scale > 0; got {self}")


class DynamicLossScaler:
    """The running scale and its update rule."""

    def __init__(self, config: LossScaleConfig = LossScaleConfig()):
        self.config = config
        self.scale = config.static_scale or float(2**config.initial_scale_power)
        self.hysteresis_left = config.hysteresis
        self.iteration = 0
        self.last_overflow_iteration = -1

    def update(self, overflow: bool) -> None:
        c = self.config
        if c.static_scale:
            self.iteration += 1
            return
        if overflow:
            if self.hysteresis_left <= 1:
                self.scale = max(self.scale / 2, c.min_scale)
            else:
                self.hysteresis_left -= 1
            self.last_overflow_iteration = self.iteration
        else:
            if c.consecutive_hysteresis:
                self.hysteresis_left = c.hysteresis
            if (self.iteration - self.last_overflow_iteration) % c.window == 0:
                if not c.consecutive_hysteresis:
                    self.hysteresis_left = c.hysteresis
                self.scale *= 2
        self.iteration += 1

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "hysteresis_left": self.hysteresis_left, "iteration": self.iteration,
                "last_overflow_iteration": self.last_overflow_iteration}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.iteration = int(state["iteration"])
        self.last_overflow_iteration = int(state["last_overflow_iteration"])
