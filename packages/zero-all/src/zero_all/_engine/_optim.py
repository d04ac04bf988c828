"""Which update rule the engine runs, and the ZeRO optimizer as torch sees it.

The rule comes from the config's ``optimizer`` block or from a client optimizer, as
DeepSpeed's ``initialize(optimizer=...)`` takes one: a ``torch.optim`` instance (or a
callable making one from the parameters). ``Adam``, ``AdamW`` and ``SGD`` (and
DeepSpeed's ``FusedAdam``/``DeepSpeedCPUAdam``) become the equivalent zero rule with the
same hyper-parameters per group (zero-kernels' fused steps: Triton on CUDA, torch's fused
CPU Adam over host shards when the optimizer state is offloaded, so one rule serves both);
with ``amsgrad`` or ``maximize`` they run as below. Any other
torch optimizer class runs as :class:`TorchRule`: the class itself, stepped on each flat fp32 shard. That is exact
for element-wise optimizers (Adagrad, RMSprop, Adamax, NAdam, ...); one whose update
depends on whole tensors (a LAMB-style trust ratio, Adafactor's factored moments) would
see a slice of a flattened shard instead of each parameter, so its step would not be
the per-tensor one -- name such optimizers in the config (``Lamb``), whose rule is
written for shards. A zero update rule instance (``zero_optim.AdamW(...)``) is
accepted as the client optimizer too.

:class:`TorchOptimizerView` is a ``torch.optim.Optimizer`` whose ``param_groups`` are
the ZeRO optimizer's own group dicts, so ``torch.optim.lr_scheduler`` classes (which
insist on a torch optimizer) schedule the ZeRO step: it is the engine's
``basic_optimizer``, what a scheduler callable is given.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

import zero_optim

from .._config import ConfigError, DeepSpeedConfig, fill_optimizer_auto

__all__ = ["TorchOptimizerView", "TorchRule", "rule_from_client", "rule_from_config"]

ParamGroups = list[dict[str, Any]]


def _plain(value: Any) -> Any:
    """A hyper-parameter as a Python value (torch keeps ``lr`` as a tensor in some set-ups)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def _adam(decoupled: bool, params: dict[str, Any]) -> Any:
    """DeepSpeed's Adam (``adam_w_mode``/``adamw_mode``: decoupled decay) as zero's rule, every
    hyper-parameter given, on or off the device alike (an offloaded run steps host shards through it)."""
    return (zero_optim.AdamW if decoupled else zero_optim.Adam)(**params)


# DeepSpeed's optimizer classes' defaults, which a config's omitted keys take (not torch's: DeepSpeed's
# FusedAdam/DeepSpeedCPUAdam, FusedLamb and FusedLion decay nothing unless told); SGD is torch's.
_DEEPSPEED_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "lamb": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "max_coeff": 10.0, "min_coeff": 0.01},
    "lion": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0},
    "sgd": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
}
# DeepSpeed's switches that zero's rules implement only at these values; other values are refused
_FIXED: dict[str, dict[str, Any]] = {
    "adam": {"bias_correction": True, "amsgrad": False},
    "lamb": {"bias_correction": True, "amsgrad": False, "eps_inside_sqrt": False},
    "lion": {},
    "sgd": {"maximize": False, "foreach": None, "differentiable": False, "fused": None},
}
_IGNORED = {"torch_adam", "set_grad_none", "fp32_optimizer_states"}  # how DeepSpeed picks a kernel: no effect here
_LAMB_NAMES = {"max_coeff": "max_trust", "min_coeff": "min_trust"}  # DeepSpeed's names for LAMB's trust bounds


def rule_from_config(config: DeepSpeedConfig) -> Any:
    """The rule of the config's ``optimizer`` block, as DeepSpeed builds it: Adam/AdamW (Adam decouples
    weight decay unless ``adam_w_mode`` is false), Lamb, Lion, SGD, or any other ``torch.optim`` class
    by name, with DeepSpeed's defaults for omitted keys. Raises :class:`ConfigError` naming
    ``optimizer.params.<key>``."""
    block = config.optimizer
    if block is None:
        raise ConfigError("optimizer: the config names no optimizer and initialize was given none "
                          "(add an \"optimizer\" block or pass optimizer=...)")
    given = fill_optimizer_auto({k: _plain(v) for k, v in block.params.items()})
    if "max_grad_norm" in given:
        raise ConfigError("optimizer.params.max_grad_norm: clip with the top-level gradient_clipping key instead "
                          "(as DeepSpeed requires)")
    kind = block.type.lower()
    kind = "adam" if kind == "adamw" else kind
    if kind not in _DEEPSPEED_DEFAULTS:
        return _torch_rule_by_name(block.type, given)
    decoupled = block.type.lower() == "adamw" or bool(given.pop("adam_w_mode", True)) if kind == "adam" else True
    for key in _IGNORED:
        given.pop(key, None)
    for key, only in _FIXED[kind].items():
        if key in given and given.pop(key) != only:
            raise ConfigError(f"optimizer.params.{key}: zero's {block.type} runs only with {key}={json.dumps(only)}")
    accepted = _DEEPSPEED_DEFAULTS[kind]
    for key in given:
        if key not in accepted:
            near = difflib.get_close_matches(key, list(accepted), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f" (it takes {', '.join(accepted)})"
            raise ConfigError(f"optimizer.params.{key}: {block.type} has no parameter {key!r}{hint}")
    params = {**accepted, **given}
    if kind == "adam":
        rule: Any = _adam(decoupled, params)
    elif kind == "lamb":
        rule = zero_optim.LAMB(**{_LAMB_NAMES.get(k, k): v for k, v in params.items()})
    elif kind == "lion":
        rule = zero_optim.Lion(**params)
    elif params["momentum"] == 0 and params["dampening"] != 0:
        rule = TorchRule(torch.optim.SGD, params)  # torch's SGD ignores dampening without momentum
    else:
        rule = zero_optim.SGD(**params)
    _check_values(rule, block.type)
    return rule


def _torch_rule_by_name(name: str, given: dict[str, Any]) -> Any:
    """Any other optimizer type is a ``torch.optim`` class of that name, as in DeepSpeed."""
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        near = difflib.get_close_matches(name, ["Adam", "AdamW", "Lamb", "Lion", "SGD", *_torch_optimizers()], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"optimizer.type: no optimizer {name!r}{hint} (zero has Adam, AdamW, Lamb, Lion and SGD, "
                          "and runs any torch.optim class by its name)")
    try:
        defaults = cls([torch.zeros(1, requires_grad=True)], **given).defaults
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer.params: torch.optim.{name}: {exc}") from None
    try:
        return TorchRule(cls, {k: _plain(v) for k, v in defaults.items()})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _torch_optimizers() -> list[str]:
    return [n for n, c in vars(torch.optim).items()
            if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer]


def _check_values(rule: Any, name: str) -> None:
    """Values out of range, as a config error naming the key (the rule's own check, reworded)."""
    try:
        zero_optim.check_hyperparameters(rule, rule.defaults, "optimizer.params")
    except ValueError as exc:
        found = re.search(r" (\w+)=(.*) must be (.*)$", str(exc))
        if found is None:
            raise ConfigError(str(exc)) from None
        key, value, reason = found.groups()
        key = {v: k for k, v in _LAMB_NAMES.items()}.get(key, key)
        raise ConfigError(f"optimizer.params.{key}: {name} takes {reason}, got {value}") from None


# -- a client optimizer ---------------------------------------------------------------------------
_UNSUPPORTED_FLAGS = ("amsgrad", "maximize")  # Adam/AdamW/SGD variants the fused rules do not implement
_DEEPSPEED_ADAMS = ("FusedAdam", "DeepSpeedCPUAdam")  # deepspeed.ops.adam's, zero_all.ops.adam's: by name


def rule_from_client(optimizer: Any) -> tuple[Any, ParamGroups | None]:
    """The zero rule for a client optimizer, and its parameter groups (``{"params": [...], <hparams>}``;
    None for a zero rule instance, which trains the model's parameters)."""
    if isinstance(optimizer, zero_optim.UpdateRule):
        return optimizer, None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"initialize(optimizer=...): expected a torch.optim.Optimizer, a callable making one "
                        f"from the parameters, or a zero_optim update rule; got {type(optimizer).__name__}")
    if any(_plain(state.get("step", 0)) for state in optimizer.state.values()):
        raise ValueError(f"initialize(optimizer=...): this {type(optimizer).__name__} has already stepped; its "
                         "state would be dropped (restore a run with engine.load_checkpoint instead)")
    groups = optimizer.param_groups
    defaults = {k: _plain(v) for k, v in optimizer.defaults.items()}
    flags = any(g.get(flag) for g in groups for flag in _UNSUPPORTED_FLAGS)
    cls = type(optimizer)
    rule: Any
    adam_keys = ("lr", "betas", "eps", "weight_decay")
    if cls in (torch.optim.Adam, torch.optim.AdamW) and not flags:
        decoupled = cls is torch.optim.AdamW or bool(defaults.get("decoupled_weight_decay", False))
        rule = _adam(decoupled, {k: defaults[k] for k in adam_keys})
    elif cls.__name__ in _DEEPSPEED_ADAMS and "adam_w_mode" in defaults and defaults.get("bias_correction", True):
        rule = _adam(bool(defaults["adam_w_mode"]), {k: defaults[k] for k in adam_keys})
    elif cls.__name__ in ("FusedLion", "DeepSpeedCPULion"):  # deepspeed.ops.lion's, by name
        rule = zero_optim.Lion(**{k: defaults[k] for k in ("lr", "betas", "weight_decay")})
    elif cls is torch.optim.SGD and not flags and not any(g["momentum"] == 0 and g["dampening"] != 0
                                                          for g in groups):
        # (torch's SGD without momentum ignores dampening; the fused rule would apply it)
        rule = zero_optim.SGD(**{k: defaults[k] for k in ("lr", "momentum", "dampening", "weight_decay",
                                                         "nesterov")})
    else:
        rule = TorchRule(cls, defaults, [{k: _plain(v) for k, v in g.items() if k != "params"} for g in groups])
    keys = rule.defaults
    return rule, [{"params": g["params"], **{k: _plain(g[k]) for k in keys if k in g}} for g in groups]


class TorchRule:
    """A torch optimizer class as a zero update rule: it steps each flat fp32 shard as one tensor.

    Its state tensors are the ones the class keeps per parameter with the parameter's
    shape (Adagrad's ``sum``, RMSprop's ``square_avg``), found by stepping the class once
    on a probe tensor; they live in the ZeRO optimizer's store like any rule's state, so
    they are partitioned, offloaded and checkpointed the same way. The step count is the
    ZeRO optimizer's. Classes with other per-parameter state (scalars such as ASGD's
    ``eta``, factored moments) or that need a closure are refused here, by name.
    """

    def __init__(self, cls: type[torch.optim.Optimizer], defaults: Mapping[str, Any],
                 groups: Iterable[Mapping[str, Any]] = ()) -> None:
        self.cls, self.name = cls, cls.__name__
        self._defaults = dict(defaults)
        names: dict[str, None] = {}
        self._step_is_tensor = True
        for hparams in [self._defaults, *groups]:  # a flag set in one group may add state (amsgrad)
            found, self._step_is_tensor = self._probe({k: hparams.get(k, v) for k, v in self._defaults.items()})
            names.update(dict.fromkeys(found))
        self.state_names = tuple(names)

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(self._defaults)

    def _probe(self, hparams: dict[str, Any]) -> tuple[list[str], bool]:
        probe = torch.zeros(3)
        probe.grad = torch.ones(3)
        try:
            opt = self.cls([probe], **hparams)
            opt.step()
        except Exception as exc:
            raise ValueError(f"optimizer: torch.optim.{self.name} cannot step a flat shard: {exc}") from None
        names, step_is_tensor = [], True
        for key, value in opt.state[probe].items():
            if isinstance(value, torch.Tensor) and value.shape == probe.shape:
                names.append(key)
            elif key == "step":
                step_is_tensor = isinstance(value, torch.Tensor)
            else:
                raise ValueError(f"optimizer: torch.optim.{self.name} keeps per-parameter state {key!r} that is not "
                                 "element-wise, so it cannot run on flat shards; name the optimizer in the config")
        return names, step_is_tensor

    def update(self, master: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, step: int,
               hparams: Mapping[str, Any], grad_scale: float, lowp_out: torch.Tensor | None) -> None:
        master.grad = grad.to(torch.float32) * grad_scale
        try:
            opt = self.cls([master], **{k: hparams[k] for k in self._defaults})
            if step > 1:  # on the first step the class initialises its own state (Adagrad's initial value)
                on_device = hparams.get("capturable") or hparams.get("fused")  # torch keeps their count there
                done: Any = step - 1
                if self._step_is_tensor:
                    done = torch.tensor(float(done), device=master.device if on_device else None)
                opt.state[master] = {**state, "step": done}
            opt.step()
            now = opt.state[master]
            for name, tensor in state.items():
                if name in now and now[name] is not tensor:
                    tensor.copy_(now[name])
        finally:
            master.grad = None
        if lowp_out is not None:
            lowp_out.copy_(master)


class TorchOptimizerView(torch.optim.Optimizer):
    """A ZeRO optimizer as a ``torch.optim.Optimizer`` for LR schedulers.

    ``param_groups`` is the ZeRO optimizer's list of group dicts itself: what a scheduler
    writes there (``lr``, ``initial_lr``, ``betas``) is what the next ZeRO step uses. The
    groups hold hyper-parameters only (the parameters are flat shards), so this view does
    not go through ``Optimizer.__init__``. ``step`` runs the ZeRO step and records the
    call the way torch's scheduler bookkeeping expects.
    """

    def __init__(self, sharded: zero_optim.ShardedOptimizer, client: Any = None) -> None:
        self.sharded = sharded
        self.defaults = dict(sharded.rule.defaults)
        self.param_groups = sharded.param_groups
        # a client torch optimizer stays the user's handle on the hyper-parameters, as in DeepSpeed (which steps it):
        # a scheduler built on it, or an lr set by hand, reaches the ZeRO groups, and what the engine changes (a
        # schedule on this view, a checkpoint loaded) reaches it; see sync_client
        self._client_groups = client.param_groups if isinstance(client, torch.optim.Optimizer) else None
        self._synced = [{k: _plain(g[k]) for k in ours if k in g}
                        for g, ours in zip(self._client_groups or [], self.param_groups, strict=False)]
        self.state = defaultdict(dict)
        self.last_step_applied = False
        self._opt_called = False
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """One ZeRO step; ``last_step_applied`` is False where it was skipped (inf/NaN gradients)."""
        if closure is not None:
            raise ValueError("a ZeRO optimizer steps on gradients from engine.backward; it takes no closure")
        self._opt_called = True  # what torch's scheduler wrapper records
        self.sync_client()
        self.last_step_applied = self.sharded.step()

    def sync_client(self) -> None:
        """Make the client optimizer's groups and the ZeRO groups agree, key by key: a value changed on the
        client's side since they last agreed is taken (its scheduler stepped), else one changed on this side is
        given to the client (a schedule on this view, a loaded checkpoint). Run before each step, before a
        checkpoint is saved and after one is loaded."""
        for theirs, ours, synced in zip(self._client_groups or [], self.param_groups, self._synced, strict=False):
            for key, agreed in synced.items():
                client, zero = _plain(theirs.get(key, agreed)), _plain(ours.get(key, agreed))
                if client != agreed:
                    ours[key] = synced[key] = client
                elif zero != agreed:
                    theirs[key] = synced[key] = zero

    # torch's LRScheduler wraps an optimizer's step to record that it ran; this one records it itself
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sharded.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        return self.sharded.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sharded.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ValueError("a ZeRO optimizer's parameter groups are fixed when it is built")

    def __repr__(self) -> str:
        return f"TorchOptimizerView({type(self.sharded).__name__}, rule={self.sharded.rule.name})"
