"""``import deepspeed`` answered by zero_all, for Hugging Face Transformers and Accelerate.

Transformers and Accelerate decide whether DeepSpeed is there with
``importlib.util.find_spec("deepspeed")`` and ``importlib.metadata.metadata("deepspeed")``, then
import ``deepspeed.*`` names. :class:`DeepSpeedAlias` is a ``sys.meta_path`` finder that answers
both: ``deepspeed`` and every ``deepspeed.X`` resolve to the very module objects ``zero_all`` and
``zero_all.X`` (one engine class, one set of module globals, whichever name imported them), and
a ``deepspeed`` distribution is reported with the DeepSpeed version zero is tested against.

Nothing here happens unless asked: ``zero hf enable`` writes a ``.pth`` line that installs the
finder at interpreter start (this file is loaded by path, standard library only, so a Python
start in that environment does not import torch), and ``ZERO_AS_DEEPSPEED=0`` turns it off for
one run. When a real DeepSpeed is installed too, zero still answers (the opt-in is explicit) and
says so with a warning naming the shadowed installation, once, at the first ``import deepspeed``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CLAIMED_VERSION", "ENV_SWITCH", "DeepSpeedAlias", "install", "installed", "uninstall"]

# The DeepSpeed release whose behaviour zero's parity tests pin (the peer measured in this repo).
# Transformers and Accelerate branch on the version (e.g. < 0.20.2: ZeRO-3 averages sequence-parallel
# gradients); claiming the release zero is checked against keeps those branches on the tested side.
CLAIMED_VERSION = "0.19.8"
ENV_SWITCH = "ZERO_AS_DEEPSPEED"
_NAME = "deepspeed"
_TARGET = "zero_all"
_log = logging.getLogger("zero_all")


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


class _AliasLoader(importlib.abc.Loader):
    """Loads ``deepspeed.X`` as the already-imported ``zero_all.X`` module object."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._saved: dict[str, Any] = {}

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(self.target)
        # the import machinery stamps the alias's spec/loader onto the module; put zero_all's back after
        self._saved = {k: module.__dict__[k] for k in ("__spec__", "__loader__", "__package__", "__file__",
                                                       "__cached__", "__path__") if k in module.__dict__}
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__dict__.update(self._saved)


class _Metadata(importlib.metadata.Distribution):
    """The ``deepspeed`` distribution's metadata, naming zero_all as what provides it."""

    def read_text(self, filename: str) -> str | None:
        if filename == "METADATA":
            return (f"Metadata-Version: 2.1\nName: {_NAME}\nVersion: {CLAIMED_VERSION}\n"
                    "Summary: zero_all serving `import deepspeed` (zero hf enable; ZERO_AS_DEEPSPEED=0 turns it off)\n")
        return None

    def locate_file(self, path: str | os.PathLike[str]) -> Path:
        spec = importlib.util.find_spec(_TARGET)
        root = Path(spec.origin).parent.parent if spec and spec.origin else Path()
        return root / path


class DeepSpeedAlias(importlib.abc.MetaPathFinder):
    """``deepspeed[.X]`` → ``zero_all[.X]`` for imports and ``importlib.metadata``."""

    zero_alias = True  # recognised by this mark, not by class: the .pth loads this file under its own name

    def __init__(self) -> None:
        self.announced = False

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if _switched_off() or not (fullname == _NAME or fullname.startswith(_NAME + ".")):
            return None
        real = _TARGET + fullname[len(_NAME):]
        try:
            found = importlib.util.find_spec(real)
        except ModuleNotFoundError:
            found = None
        if found is None:
            return None  # deepspeed.X that zero does not provide: a plain ModuleNotFoundError
        if fullname == _NAME:
            self._announce()
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real),
                                              is_package=found.submodule_search_locations is not None)

    def find_distributions(self, context: Any = None) -> Iterable[importlib.metadata.Distribution]:
        name = getattr(context, "name", None)
        if _switched_off() or name is None or name.lower().replace("_", "-") != _NAME:
            return []
        return [_Metadata()]

    def _announce(self) -> None:
        if self.announced:
            return
        self.announced = True
        shadowed = _real_deepspeed()
        if shadowed:
            _log.warning("`import deepspeed` runs zero_all (enabled by `zero hf enable`), not the DeepSpeed installed "
                         "at %s; set %s=0 or run `zero hf disable` to use that DeepSpeed", shadowed, ENV_SWITCH)
        else:
            _log.info("`import deepspeed` runs zero_all (enabled by `zero hf enable`; %s=0 turns it off)", ENV_SWITCH)


def _real_deepspeed() -> str | None:
    """Where a real DeepSpeed is installed (its package folder), if one is on ``sys.path``."""
    for finder in sys.meta_path:
        if _is_alias(finder) or not hasattr(finder, "find_spec"):
            continue
        try:
            spec = finder.find_spec(_NAME, None)
        except (ImportError, ValueError):
            continue
        if spec is not None:
            return str(spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0])
    return None


def _is_alias(finder: object) -> bool:
    return getattr(finder, "zero_alias", False) is True


def installed() -> DeepSpeedAlias | None:
    """The finder if ``import deepspeed`` is zero_all's in this process."""
    return next((f for f in sys.meta_path if isinstance(f, DeepSpeedAlias) or _is_alias(f)), None)  # type: ignore[return-value]


def install() -> DeepSpeedAlias:
    """Put the finder first on ``sys.meta_path`` (idempotent). Refused once a real ``deepspeed`` is
    imported in this process: two implementations under one name would be ambiguous."""
    finder = installed()
    if finder is not None:
        return finder
    loaded = sys.modules.get(_NAME)
    if loaded is not None and getattr(loaded, "__name__", "") != _TARGET:
        where = getattr(loaded, "__file__", "?")
        raise RuntimeError(f"a real DeepSpeed is already imported in this process ({where}): enable zero as "
                           "deepspeed before anything imports deepspeed")
    finder = DeepSpeedAlias()
    sys.meta_path.insert(0, finder)
    importlib.invalidate_caches()
    return finder


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not _is_alias(f)]
    for name in [n for n in sys.modules if n == _NAME or n.startswith(_NAME + ".")]:
        if getattr(sys.modules[name], "__name__", "").startswith(_TARGET):
            del sys.modules[name]
