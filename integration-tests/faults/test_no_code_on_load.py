"""Checkpoints never execute code on load: no call anywhere in the packages' sources unpickles without
``weights_only=True`` (a planted pickle is refused: test_ckpt_load.py shows it at run time)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for p in [*ROOT.glob("packages/*/src/**/*.py"), *ROOT.glob("kernels/src/**/*.py")]
                 if "build" not in p.parts)
# the test harness reads back what the ranks it spawned returned: never a file, never a checkpoint
TRUSTED = {"packages/zero-comm/src/zero_comm/testing.py"}
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("marshal", "loads"),
              ("marshal", "load"), ("dill", "load"), ("dill", "loads"), ("cloudpickle", "loads")}


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):  # `from pickle import loads` would hide the call from the rest
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                      if (node.module, a.name) in UNPICKLERS]
            continue
        if isinstance(node, ast.Import):  # `import pickle as p` likewise
            found += [(node.lineno, f"import {a.name} as {a.asname}") for a in node.names
                      if a.asname and any(a.name == owner for owner, _ in UNPICKLERS)]
            continue
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            continue
        owner, attr = node.func.value.id, node.func.attr
        if owner == "torch" and attr == "load":
            safe = keyword(node, "weights_only")
            if not (isinstance(safe, ast.Constant) and safe.value is True):
                found.append((node.lineno, "torch.load without weights_only=True"))
        elif (owner, attr) in UNPICKLERS:
            found.append((node.lineno, f"{owner}.{attr}"))
        elif owner in ("np", "numpy") and attr == "load":
            allow = keyword(node, "allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                found.append((node.lineno, "numpy.load(allow_pickle=True)"))
    return found


def test_no_source_unpickles_code():
    assert len(SOURCES) > 50, "the scan found too few source files: the glob is wrong"
    bad = []
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        if rel in TRUSTED:
            continue
        bad += [f"{rel}:{line}: {what}" for line, what in unsafe_calls(ast.parse(path.read_text(), rel))]
    assert not bad, "unpickling that can run code on load:\n" + "\n".join(bad)


def test_the_scan_finds_what_it_forbids():
    planted = ast.parse("import torch, pickle\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
                        "torch.load(f, weights_only=True)\npickle.loads(b)\nfrom pickle import loads\n"
                        "import marshal as m\nimport pickle\n")
    assert sorted(line for line, _ in unsafe_calls(planted)) == [2, 3, 5, 6, 7]
