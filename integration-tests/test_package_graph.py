"""The source tree keeps DESIGN.md's package graph: each package imports only the zero packages it may,
and no package has an import circle among its own modules, counting imports deferred into functions
(a deferred import hides a circle; it does not remove it). Imports only for type checking are exempt."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {p.name: p for p in (ROOT / "packages").glob("*/src/zero_*")}
SOURCES["zero_kernels"] = ROOT / "kernels" / "src" / "zero_kernels"
MAY_IMPORT = {  # DESIGN.md, "Who may import whom"
    "zero_kernels": set(), "zero_comm": set(), "zero_offload": set(),
    "zero_ckpt": {"zero_comm"}, "zero_pipe": {"zero_comm"}, "zero_optim": {"zero_comm", "zero_kernels"},
    "zero_all": {"zero_comm", "zero_optim", "zero_offload", "zero_ckpt", "zero_pipe", "zero_kernels"},
}


def _module(package: Path, path: Path) -> str:
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module named by an import in ``path``, wherever it sits, except under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                   ast.unparse(node.test) for child in node.body for n in ast.walk(child)}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package[:len(package) - node.level + 1]
                base = ".".join([*parent, node.module] if node.module else parent)
            else:
                base = node.module or ""
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


def _graph(name: str) -> dict[str, set[str]]:
    package = SOURCES[name]
    files = {_module(package, f): f for f in package.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        # a module importing its own package (or a parent) runs the parent's __init__, which imported it first
        graph[module] = {m for m in _imports(path, module) if m in files and m != module
                         and not module.startswith(m + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                return [*path[path.index(nxt):], nxt]
            if nxt not in done and (found := visit(nxt, [*path, nxt])):
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (found := visit(start, [start])):
            return found
    return None


@pytest.mark.parametrize("name", sorted(MAY_IMPORT))
def test_package_imports_only_what_design_allows(name: str) -> None:
    package = SOURCES[name]
    wrong = {}
    for path in package.rglob("*.py"):
        others = {m.split(".")[0] for m in _imports(path, _module(package, path))} & set(MAY_IMPORT)
        if bad := others - MAY_IMPORT[name] - {name}:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"{name} may import only {sorted(MAY_IMPORT[name]) or 'torch'}; found {wrong}"


@pytest.mark.parametrize("name", sorted(MAY_IMPORT))
def test_package_has_no_import_circle(name: str) -> None:
    cycle = _cycle(_graph(name))
    assert cycle is None, f"import circle in {name}: {' -> '.join(cycle)}"


def test_the_check_sees_a_circle_and_a_deferred_one(tmp_path: Path) -> None:
    package = tmp_path / "zero_fake"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_a.py").write_text("from ._b import thing\n")
    (package / "_b.py").write_text("def thing():\n    from ._a import other\n")
    (package / "_c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._a import x\n")
    SOURCES["zero_fake"] = package
    try:
        assert _cycle(_graph("zero_fake")) == ["zero_fake._a", "zero_fake._b", "zero_fake._a"]
        assert _graph("zero_fake")["zero_fake._c"] == set()
    finally:
        del SOURCES["zero_fake"]
