"""Update rules: how one flat fp32 shard moves, given its gradient and its state.

A rule is small and pure in spirit (optax's ``update``): it owns no tensors, it is
told the shard, its gradient, its state tensors and the group's hyper-parameters,
and it updates them in place through zero-kernels' fused ops (Triton on CUDA, the
torch reference elsewhere). Loss scaling and clipping reach it as one number,
``grad_scale``, folded into the same pass.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

import zero_kernels as zk

__all__ = ["LAMB", "SGD", "Adam", "AdamW", "Lion", "UpdateRule", "check_hyperparameters"]


@runtime_checkable
class UpdateRule(Protocol):
    """One optimizer's maths over a flat fp32 shard."""

    name: str
    defaults: Mapping[str, Any]
    state_names: tuple[str, ...]

    def update(self, master: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, step: int,
               hparams: Mapping[str, Any], grad_scale: float, lowp_out: torch.Tensor | None) -> None: ...


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_VALID: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "eps": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "betas": (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
              "a pair of numbers in [0, 1)"),
    "momentum": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "dampening": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "nesterov": (lambda v: isinstance(v, bool), "True or False"),
    "min_trust": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "max_trust": (lambda v: _number(v) and v > 0, "a finite number > 0"),
}


def check_hyperparameters(rule: UpdateRule, given: Mapping[str, Any], where: str) -> None:
    """Refuse hyper-parameters the rule does not know (naming the nearest one it does) and values
    out of range."""
    for key in given:
        if key in ("params", "name") or key in rule.defaults:
            continue
        near = difflib.get_close_matches(key, list(rule.defaults), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; {rule.name} takes {', '.join(rule.defaults)}"
        raise ValueError(f"{where}: {rule.name} has no hyper-parameter {key!r}{hint}")
    for key, value in {**rule.defaults, **{k: v for k, v in given.items() if k in rule.defaults}}.items():
        valid, expected = _VALID.get(key, (lambda v: True, ""))
        if not valid(value):
            raise ValueError(f"{where}: {rule.name} {key}={value!r} must be {expected}")


@dataclass(frozen=True)
class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), torch.optim.AdamW's maths."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    name: str = field(default="AdamW", init=False)
    state_names: tuple[str, ...] = field(default=("exp_avg", "exp_avg_sq"), init=False)
    decoupled: bool = field(default=True, init=False)

    @property
    def defaults(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def update(self, master, grad, state, *, step, hparams, grad_scale, lowp_out):
        b1, b2 = hparams["betas"]
        zk.adam_step(master, grad, state["exp_avg"], state["exp_avg_sq"], lr=hparams["lr"], beta1=b1, beta2=b2,
                     eps=hparams["eps"], weight_decay=hparams["weight_decay"], step=step,
                     decoupled=self.decoupled, grad_scale=grad_scale, lowp_out=lowp_out)


@dataclass(frozen=True)
class Adam(AdamW):
    """Adam with L2 weight decay added to the gradient (torch.optim.Adam's maths)."""

    weight_decay: float = 0.0
    name: str = field(default="Adam", init=False)
    decoupled: bool = field(default=False, init=False)


@dataclass(frozen=True)
class Lion:
    """Lion (Chen et al., 2023): the sign of an interpolated momentum."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    name: str = field(default="Lion", init=False)
    state_names: tuple[str, ...] = field(default=("exp_avg",), init=False)

    @property
    def defaults(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "weight_decay": self.weight_decay}

    def update(self, master, grad, state, *, step, hparams, grad_scale, lowp_out):
        b1, b2 = hparams["betas"]
        zk.lion_step(master, grad, state["exp_avg"], lr=hparams["lr"], beta1=b1, beta2=b2,
                     weight_decay=hparams["weight_decay"], grad_scale=grad_scale, lowp_out=lowp_out)


@dataclass(frozen=True)
class SGD:
    """SGD with momentum, torch.optim.SGD's maths."""

    lr: float = 1e-2
    momentum: float = 0.9
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    name: str = field(default="SGD", init=False)
    state_names: tuple[str, ...] = field(default=("momentum_buffer",), init=False)

    @property
    def defaults(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "weight_decay": self.weight_decay, "nesterov": self.nesterov}

    def update(self, master, grad, state, *, step, hparams, grad_scale, lowp_out):
        zk.sgd_step(master, grad, state["momentum_buffer"], lr=hparams["lr"], momentum=hparams["momentum"],
                    dampening=hparams["dampening"], weight_decay=hparams["weight_decay"],
                    nesterov=hparams["nesterov"], first_step=step == 1, grad_scale=grad_scale, lowp_out=lowp_out)


@dataclass(frozen=True)
class LAMB:
    """LAMB (You et al., 2020): Adam's direction, scaled per parameter by a trust ratio.

    For each parameter tensor ``w`` with Adam direction ``u = m̂ / (sqrt(v̂) + eps) + weight_decay * w``,
    the step is ``lr * clamp(||w|| / ||u||, min_trust, max_trust) * u`` (a ratio of 1 where either
    norm is 0). The norms are of whole parameters, which a shard may hold only part of, so the
    optimizer runs LAMB in two phases: ``direction`` on every chunk, then one all-reduce of the
    per-parameter sums of squares, then ``apply`` with each element's ratio.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    min_trust: float = 0.01
    max_trust: float = 10.0
    name: str = field(default="LAMB", init=False)
    state_names: tuple[str, ...] = field(default=("exp_avg", "exp_avg_sq"), init=False)
    needs_parameter_norms: bool = field(default=True, init=False)

    @property
    def defaults(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay,
                "min_trust": self.min_trust, "max_trust": self.max_trust}

    def direction(self, master: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, step: int,
                  hparams: Mapping[str, Any], grad_scale: float) -> torch.Tensor:
        """Advance the moments in place; return the update direction ``u`` (a new fp32 tensor)."""
        b1, b2 = hparams["betas"]
        g = grad.to(torch.float32) * grad_scale
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        u = (m / (1.0 - b1**step)).div_((v / (1.0 - b2**step)).sqrt_().add_(hparams["eps"]))
        return u.add_(master, alpha=hparams["weight_decay"]) if hparams["weight_decay"] else u

    def trust(self, weight_norm: torch.Tensor, update_norm: torch.Tensor,
              hparams: Mapping[str, Any]) -> torch.Tensor:
        ratio = (weight_norm / update_norm).clamp_(hparams["min_trust"], hparams["max_trust"])
        return torch.where((weight_norm > 0) & (update_norm > 0), ratio, torch.ones_like(ratio))

    def apply(self, master: torch.Tensor, u: torch.Tensor, trust: torch.Tensor, *, hparams: Mapping[str, Any],
              lowp_out: torch.Tensor | None) -> None:
        master.addcmul_(trust, u, value=-hparams["lr"])
        if lowp_out is not None:
            lowp_out.copy_(master)

    def update(self, master, grad, state, *, step, hparams, grad_scale, lowp_out):
        """The whole of ``master`` as one parameter (what the two phases reduce to for one tensor)."""
        u = self.direction(master, grad, state, step=step, hparams=hparams, grad_scale=grad_scale)
        ratio = self.trust(master.norm(), u.norm(), hparams)
        self.apply(master, u, ratio.expand_as(u), hparams=hparams, lowp_out=lowp_out)
