"""``zero hf enable|disable|status``: the one install step that lets Hugging Face reach zero as DeepSpeed.

``enable`` writes ``zero-as-deepspeed.pth`` into the environment's site-packages. Python runs its one line
at every start; the line loads :mod:`._alias` by its path (standard library only: no torch import at
start-up) and puts the finder first on ``sys.meta_path``. From then on, in that environment, ``import
deepspeed`` is zero_all unless ``ZERO_AS_DEEPSPEED=0``; ``disable`` removes the file. Nothing is written
anywhere else, and nothing happens without ``enable``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

from . import _alias

__all__ = ["PTH_NAME", "add_hf_parser", "disable", "enable", "pth_line", "status"]

PTH_NAME = "zero-as-deepspeed.pth"


def pth_line(alias_file: Path) -> str:
    """The ``.pth`` line: load ``alias_file`` once per interpreter (under one module name) and install it."""
    name = "_zero_as_deepspeed"
    return (f"import sys, os, importlib.util as u; p = {str(alias_file)!r}; m = sys.modules.get({name!r}); "
            f"s = m is None and os.path.exists(p) and u.spec_from_file_location({name!r}, p); "
            f"m = m or (s and u.module_from_spec(s)); "
            f"s and (sys.modules.__setitem__({name!r}, m), s.loader.exec_module(m)); m and m.install()\n")


def _site_dir(given: str | None) -> Path:
    return Path(given) if given else Path(sysconfig.get_paths()["purelib"])


def enable(site_dir: str | None = None) -> Path:
    """Write the ``.pth`` file; returns its path (rewritten if present: it names this zero_all's copy)."""
    target = _site_dir(site_dir) / PTH_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(pth_line(Path(_alias.__file__).resolve()))
    os.replace(partial, target)
    return target


def disable(site_dir: str | None = None) -> Path | None:
    """Remove the ``.pth`` file; returns its path, or None when there was none."""
    target = _site_dir(site_dir) / PTH_NAME
    if not target.exists():
        return None
    target.unlink()
    return target


def status(site_dir: str | None = None) -> dict[str, Any]:
    """Whether zero is enabled here, what ``import deepspeed`` gives this process, and any real DeepSpeed."""
    target = _site_dir(site_dir) / PTH_NAME
    finder = _alias.installed()
    loaded = sys.modules.get("deepspeed")  # once imported, find_spec reads the module's own (zero_all's) spec
    if loaded is not None:
        serves = getattr(loaded, "__name__", "") == "zero_all"
    else:
        spec = importlib.util.find_spec("deepspeed")
        serves = spec is not None and type(spec.loader).__name__ == "_AliasLoader"
    try:
        claimed = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        claimed = None
    return {"pth": str(target), "enabled": target.exists(), "active": finder is not None and serves,
            "switched_off": os.environ.get(_alias.ENV_SWITCH, "") == "0", "deepspeed_version": claimed,
            "real_deepspeed": _alias._real_deepspeed()}


def _cmd(args: argparse.Namespace) -> int:
    if args.hf_command == "enable":
        try:
            path = enable(args.site_dir)
        except OSError as exc:
            print(f"zero hf enable: error: cannot write {PTH_NAME} into {_site_dir(args.site_dir)} ({exc.strerror}); "
                  "use a virtual environment you can write to, or --site-dir", file=sys.stderr)
            return 2
        print(f"zero hf: `import deepspeed` now runs zero_all in this environment ({path}); "
              f"{_alias.ENV_SWITCH}=0 turns it off for one run, `zero hf disable` for good")
        real = _alias._real_deepspeed()
        if real:
            print(f"zero hf: note: DeepSpeed is installed too ({real}); zero answers `import deepspeed` while enabled",
                  file=sys.stderr)
        return 0
    if args.hf_command == "disable":
        removed = disable(args.site_dir)
        print(f"zero hf: disabled (removed {removed})" if removed else "zero hf: was not enabled here")
        return 0
    info = status(args.site_dir)
    what = ("zero_all" if info["active"] else "a real DeepSpeed" if info["real_deepspeed"] else "nothing")
    print(f"enabled: {info['enabled']} ({info['pth']})\n`import deepspeed` in this process: {what}"
          f"{' (' + _alias.ENV_SWITCH + '=0)' if info['switched_off'] else ''}\n"
          f"deepspeed version reported: {info['deepspeed_version']}\nreal DeepSpeed: {info['real_deepspeed']}")
    return 0


def add_hf_parser(sub: Any) -> None:
    hf = sub.add_parser("hf", help="let Hugging Face Transformers and Accelerate use zero as DeepSpeed",
                        description="enable: from now on `import deepspeed` in this Python environment runs zero_all "
                        "(a .pth file in site-packages; ZERO_AS_DEEPSPEED=0 turns it off for one run), so "
                        "TrainingArguments(deepspeed=...) and Accelerate's DeepSpeed plugin train on zero. "
                        "disable: remove it. status: what `import deepspeed` gives. Docs: docs/huggingface.md.")
    hf_sub = hf.add_subparsers(dest="hf_command", metavar="COMMAND", required=True)
    for name, text in (("enable", "make `import deepspeed` run zero_all in this environment"),
                       ("disable", "undo `zero hf enable`"), ("status", "what `import deepspeed` gives here")):
        cmd = hf_sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--site-dir", default=None, help="the site-packages folder (default: this environment's)")
        cmd.set_defaults(func=_cmd)
