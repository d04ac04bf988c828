"""The opt-in that lets Hugging Face reach zero as DeepSpeed (``zero hf enable``): what it writes, what
``import deepspeed`` then gives, the switch that turns it off for one run, and a real DeepSpeed: shadowed
only while enabled, and said so naming where it is. Each case runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# a fresh interpreter as zero hf enable leaves it, whatever this environment has enabled itself: the finder an
# environment-wide .pth installed is taken out, then the .pth under test is processed as Python does at start
FRESH = """
import sys, site
sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "zero_alias", False) is not True]
sys.modules.pop("_zero_as_deepspeed", None)
site.addsitedir({site_dir!r})
"""


def python(code: str, site_dir: Path, **env: str) -> subprocess.CompletedProcess:
    full = FRESH.format(site_dir=str(site_dir)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **env})


def zero(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zero_all", *args], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.fixture
def enabled(tmp_path: Path) -> Path:
    site_dir = tmp_path / "site"
    done = zero("hf", "enable", "--site-dir", str(site_dir))
    assert done.returncode == 0, done.stderr
    assert (site_dir / "zero-as-deepspeed.pth").is_file() and "zero hf disable" in done.stdout
    return site_dir


def test_enabled_import_deepspeed_is_zero_all_with_deepspeeds_metadata(enabled: Path):
    done = python("""
        assert "torch" not in sys.modules, "the start-up line must not import torch"
        import importlib.metadata, importlib.util
        assert importlib.util.find_spec("deepspeed") is not None
        print(importlib.metadata.version("deepspeed"))
        import deepspeed, zero_all
        from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES
        from deepspeed.runtime.zero import partition_parameters
        assert deepspeed is zero_all and deepspeed.runtime.engine.DeepSpeedEngine is zero_all.Engine
        assert zero_all.__spec__.name == "zero_all"  # the alias leaves zero_all's own identity alone
        print("WarmupDecayLR" in VALID_LR_SCHEDULES)
    """, enabled)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0.19.8", "True"]


def test_switched_off_for_one_run_and_disabled_for_good(enabled: Path):
    off = python("""
        import importlib.metadata
        try:
            importlib.metadata.version("deepspeed")
        except importlib.metadata.PackageNotFoundError:
            print("no metadata")
        import deepspeed
    """, enabled, ZERO_AS_DEEPSPEED="0")
    assert "no metadata" in off.stdout and "ModuleNotFoundError: No module named 'deepspeed'" in off.stderr
    assert zero("hf", "disable", "--site-dir", str(enabled)).returncode == 0
    assert not (enabled / "zero-as-deepspeed.pth").exists()
    assert "was not enabled" in zero("hf", "disable", "--site-dir", str(enabled)).stdout
    gone = python("import deepspeed", enabled)
    assert "No module named 'deepspeed'" in gone.stderr


def test_a_real_deepspeed_is_shadowed_only_while_enabled_and_named(enabled: Path, tmp_path: Path):
    real = tmp_path / "real" / "deepspeed"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("REAL = True\n")
    path = {"PYTHONPATH": str(real.parent)}
    ours = python("import deepspeed; print(deepspeed.__name__)", enabled, **path)
    assert ours.stdout.strip() == "zero_all"
    assert f"not the DeepSpeed installed at {real / '__init__.py'}" in ours.stderr  # said, naming it
    theirs = python("import deepspeed; print(deepspeed.REAL)", enabled, ZERO_AS_DEEPSPEED="0", **path)
    assert theirs.stdout.strip() == "True" and "zero_all" not in theirs.stderr
    late = python("""
        sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "zero_alias", False) is not True]
        import deepspeed
        from zero_all._hf._alias import install
        install()
    """, enabled, **path)
    assert "RuntimeError: a real DeepSpeed is already imported in this process" in late.stderr


def test_a_deepspeed_module_zero_lacks_is_a_plain_import_error(enabled: Path):
    done = python("import deepspeed.runtime.sequence_parallel.ulysses_sp", enabled)
    assert "ModuleNotFoundError: No module named 'deepspeed.runtime.sequence_parallel'" in done.stderr


def test_status_says_what_import_deepspeed_gives(enabled: Path):
    done = zero("hf", "status", "--site-dir", str(enabled))
    assert done.returncode == 0 and f"enabled: True ({enabled / 'zero-as-deepspeed.pth'})" in done.stdout
