"""Every check zero runs, each in its own virtual environment.

    nox                      the default sessions: lint, types, tests (each package alone), kernels, integration, hf
    nox -s tests             each package installed alone, with only its declared dependencies
    nox -s "tests(package='zero-comm')"
    nox -s integration       all packages together: parity and end-to-end runs (the fault suite included)
    nox -s faults            the fault suite alone: bad checkpoints, dead and hung ranks, launcher errors
    nox -s hf                with the optional Hugging Face extra (transformers, pinned): integration-tests/hf
    nox -s kernels           zero-kernels' Triton kernels under TRITON_INTERPRET=1
    nox -s demo              train a small GPT on several CPU ranks
    nox -s bench             every benchmark against its baseline in the same run; writes docs/benchmarks.md

torch is pinned by ``constraints.txt`` (the local CPU build) for every session.
Packages are discovered, not listed: any ``packages/*/pyproject.toml`` or
``kernels/pyproject.toml``.
"""

from __future__ import annotations

import re
from pathlib import Path

import nox
import tomllib

ROOT = Path(__file__).parent
CONSTRAINTS = str(ROOT / "constraints.txt")

nox.options.sessions = ["lint", "types", "tests", "kernels", "integration", "hf"]
nox.options.error_on_missing_interpreters = True
nox.options.default_venv_backend = "virtualenv"


def _discover() -> dict[str, Path]:
    dirs = sorted(ROOT.glob("packages/*/pyproject.toml")) + sorted(ROOT.glob("kernels/pyproject.toml"))
    packages = {}
    for pyproject in dirs:
        name = tomllib.loads(pyproject.read_text())["project"]["name"]
        packages[name] = pyproject.parent
    return packages


PACKAGES = _discover()


def _requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def _local_closure(name: str) -> list[Path]:
    """The package's own directory after those of the local packages it depends on, in install order."""
    order: list[Path] = []

    def visit(n: str) -> None:
        path = PACKAGES[n]
        deps = tomllib.loads((path / "pyproject.toml").read_text())["project"].get("dependencies", [])
        for dep in deps:
            dep_name = _requirement_name(dep)
            if dep_name in PACKAGES and PACKAGES[dep_name] not in order:
                visit(dep_name)
        if path not in order:
            order.append(path)

    visit(name)
    return order


def _install(session: nox.Session, *packages: str, extras: str = "test") -> None:
    """Install ``packages`` (non-editable, so tests see what a user would) and their local deps."""
    paths: list[Path] = []
    for name in packages:
        for path in _local_closure(name):
            if path not in paths:
                paths.append(path)
    targets = [f"{p}[{extras}]" if p in (PACKAGES[n] for n in packages) and extras else str(p) for p in paths]
    session.install("-c", CONSTRAINTS, *targets)


def _pytest(session: nox.Session, *args: str) -> None:
    # pytest exits 5 when it collects nothing; nox counts any non-zero exit as a failure.
    session.run("pytest", "-p", "no:cacheprovider", *args, *session.posargs)


@nox.session
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """One package installed alone, with only its declared dependencies, runs its own tests."""
    _install(session, package)
    tests_dir = PACKAGES[package] / "tests"
    session.chdir(tests_dir)  # never import the source tree: test what was installed
    _pytest(session, str(tests_dir), "--rootdir", str(PACKAGES[package]))


@nox.session
def integration(session: nox.Session) -> None:
    """Every package together: parity with plain PyTorch and end-to-end runs."""
    _install(session, *PACKAGES)
    session.install("-c", CONSTRAINTS, "pytest", "pytest-timeout")
    # integration-tests/hf needs the optional transformers: the `hf` session runs it
    _pytest(session, str(ROOT / "integration-tests"), "--rootdir", str(ROOT / "integration-tests"),
            "--ignore", str(ROOT / "integration-tests" / "hf"))


@nox.session
def hf(session: nox.Session) -> None:
    """The Hugging Face integrations (``zero-all[hf]``: transformers and accelerate, pinned by constraints.txt):
    init_inference on HF models, and the Trainer and Accelerate training on zero after ``zero hf enable``."""
    _install(session, *PACKAGES)
    session.install("-c", CONSTRAINTS, "pytest", "pytest-timeout", "transformers", "accelerate")
    session.run("zero", "hf", "enable")  # the documented opt-in: `import deepspeed` is zero_all in this venv
    _pytest(session, str(ROOT / "integration-tests" / "hf"), "--rootdir", str(ROOT / "integration-tests"))


@nox.session
def faults(session: nox.Session) -> None:
    """The fault suite alone (``integration-tests/faults``; ``integration`` runs it too)."""
    _install(session, *PACKAGES)
    session.install("-c", CONSTRAINTS, "pytest", "pytest-timeout")
    _pytest(session, str(ROOT / "integration-tests" / "faults"), "--rootdir", str(ROOT / "integration-tests"))


@nox.session
def kernels(session: nox.Session) -> None:
    """zero-kernels' Triton kernels run on CPU tensors in the interpreter, against their references."""
    if "zero-kernels" not in PACKAGES:
        session.error("kernels/ (the zero-kernels package) does not exist yet")
    _install(session, "zero-kernels")
    session.env["TRITON_INTERPRET"] = "1"  # the tests' `path` fixture forces the Triton path for these
    tests_dir = PACKAGES["zero-kernels"] / "tests"
    session.chdir(tests_dir)
    _pytest(session, str(tests_dir), "--rootdir", str(PACKAGES["zero-kernels"]), "-m", "triton")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", str(ROOT))


@nox.session
def types(session: nox.Session) -> None:
    """mypy over every package's sources."""
    _install(session, *PACKAGES, extras="")
    session.install("-c", CONSTRAINTS, "mypy==2.4.1")
    for path in PACKAGES.values():
        session.run("mypy", str(path / "src"))


@nox.session
def demo(session: nox.Session) -> None:
    """Train a small GPT on the standard library's source: 2 CPU ranks, ZeRO-3 + CPU offload, via `zero run`."""
    _install(session, *PACKAGES, extras="")
    session.install("-c", CONSTRAINTS, "matplotlib")
    out = ROOT / "demo-output"
    session.run("zero", "run", "--nproc", "2", str(ROOT / "examples" / "train_gpt.py"),
                "--deepspeed_config", str(ROOT / "examples" / "ds_config.json"), "--out", str(out),
                *session.posargs, env={"OMP_NUM_THREADS": "1"})


@nox.session
def deepspeed(session: nox.Session) -> None:
    """The same DeepSpeed script under DeepSpeed 0.19.8 and under zero: losses and wall time (optional)."""
    _install(session, *PACKAGES, extras="")
    session.install("-c", CONSTRAINTS, "deepspeed==0.19.8")
    session.run("python", str(ROOT / "benchmarks" / "vs_deepspeed.py"), *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark, each as a ratio to a baseline measured in the same run, then docs/benchmarks.md.

    ``nox -s bench -- --only zero_step,memory`` runs some (the page keeps the others' last results).
    """
    _install(session, *PACKAGES, extras="")
    # pytest: activations.py measures with the zero-ckpt test's own model and measurement
    session.install("-c", CONSTRAINTS, "matplotlib", "transformers", "pytest")
    session.run("python", str(ROOT / "benchmarks" / "bench.py"), *session.posargs)
