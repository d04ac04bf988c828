"""The README's install command, run as a new user would: a fresh virtual environment, the
command copied from the README, then every package imported.

An index that offers a same-named, higher-versioned ``zero-comm`` (a dependency-confusion
impostor) is put in front of pip for the whole run: the checkout's copy must still be the one
installed, because the command names every sibling by its path.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["zero_comm", "zero_kernels", "zero_offload", "zero_ckpt", "zero_pipe", "zero_optim", "zero_all"]

pytestmark = pytest.mark.timeout(900)


def _readme_command(section: str) -> str:
    """The first ``pip install`` line of the first code block under the README heading ``section``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"### {section}\n")
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block, f"README section {section!r} has no sh code block"
    line = next(ln for ln in block.group(1).splitlines() if ln.startswith("pip install"))
    return line.split("#")[0].strip()


def _impostor_wheel(where: Path, name: str, version: str) -> Path:
    """A wheel of ``name`` at ``version`` whose module marks itself as not ours."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": "IMPOSTOR = True\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, body in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(body.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(body.encode())}")
    record.append(f"{dist}/RECORD,,")
    wheel = where / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, body in files.items():
            zf.writestr(path, body)
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


def test_readme_install_command_installs_the_checkout_not_an_impostor(tmp_path: Path) -> None:
    """The documented one-line install gives a venv where every zero package imports, each from
    the checkout, even when an index offers a zero-comm 99.0."""
    command = _readme_command("Install from a checkout")
    assert command.startswith("pip install") and "./packages/*" in command, command
    index = tmp_path / "index"
    index.mkdir()
    _impostor_wheel(index, "zero-comm", "99.0")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    pip = command.replace("pip install", f"{python} -m pip install -q --find-links {index}", 1)
    done = subprocess.run(["bash", "-c", pip], cwd=ROOT, check=False, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    probe = ("import importlib, importlib.metadata as md\n"
             f"for name in {PACKAGES!r}:\n"
             "    m = importlib.import_module(name)\n"
             "    assert not hasattr(m, 'IMPOSTOR'), name\n"
             "    print(name, md.version(name.replace('_', '-')))\n")
    done = subprocess.run([str(python), "-c", probe], check=False, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    versions = dict(line.split() for line in done.stdout.splitlines())
    assert set(versions) == set(PACKAGES)
    assert versions["zero_comm"] != "99.0"
    direct = subprocess.run([str(python), "-c", "import importlib.metadata as md; "
                             "print(md.distribution('zero-comm').read_text('direct_url.json'))"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert (ROOT / "packages" / "zero-comm").as_uri() in direct.stdout, direct.stdout


def test_readme_names_each_package_with_its_siblings() -> None:
    """Each package's install line in the README names every zero package it depends on."""
    import tomllib

    text = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (zero-[a-z]+) \| `(pip install [^`]+)` \|$", text, re.M))
    paths = {tomllib.loads(p.read_text())["project"]["name"]: p.parent.relative_to(ROOT)
             for p in [*ROOT.glob("packages/*/pyproject.toml"), ROOT / "kernels" / "pyproject.toml"]}
    assert set(rows) == set(paths), f"README install table lists {sorted(rows)}"
    for name, line in rows.items():
        deps = tomllib.loads((ROOT / paths[name] / "pyproject.toml").read_text())["project"]["dependencies"]
        wanted = {re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0] for d in deps} & set(paths)
        for dep in wanted | {name}:
            path = f"./{paths[dep]}"
            assert path in line or ("./packages/*" in line and str(paths[dep]).startswith("packages/")), \
                f"README: {name}'s install line does not name {dep} ({path}): {line}"
    assert sys.version_info >= (3, 10)
