"""What every benchmark here shares: how a goal is recorded, and matplotlib without a display.

A goal is one measured ratio against its target, written into the benchmark's JSON under
``"goals"`` so that ``benchmarks/report.py`` can list every goal of every benchmark, met or
missed, without knowing each benchmark's own layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def goal(what: str, value: float, target: float, better: str = "lower") -> dict[str, Any]:
    """``value`` against ``target``; ``better`` is "lower" (a time ratio) or "higher" (a bandwidth share)."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    met = value <= target if better == "lower" else value >= target
    return {"what": what, "value": float(value), "goal": float(target), "better": better, "met": bool(met)}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Model-state bytes per rank by the ZeRO paper's formula, Ψ parameters over N ranks, Adam's two
# moments; fp32 weights are their own masters (no copy), bf16 keeps fp32 masters beside them.
_FORMULA = {
    ("bf16", 0): (16, 0), ("bf16", 1): (4, 12), ("bf16", 2): (2, 14), ("bf16", 3): (0, 16),
    ("fp32", 0): (16, 0), ("fp32", 1): (8, 8), ("fp32", 2): (4, 12), ("fp32", 3): (0, 16),
}


def zero_formula_bytes(params: int, world: int, stage: int, precision: str) -> float:
    """Bytes of weights, gradients, masters and moments one rank holds: whole ``a``Ψ + sharded ``b``Ψ/N."""
    whole, sharded = _FORMULA[precision, stage]
    return whole * params + sharded * params / world


def table(header: list[str], rows: list[list[str]]) -> dict[str, Any]:
    """A table for the report, cells already formatted: ``{"header": [...], "rows": [[...], ...]}``."""
    if any(len(r) != len(header) for r in rows):
        raise ValueError(f"every row needs {len(header)} cells")
    return {"header": header, "rows": rows}


def write_results(out: Path, name: str, payload: dict[str, Any], fig: Any) -> None:
    """``<name>.json`` and ``<name>.png`` (the figure, closed) into ``out``, saying where."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    pyplot().close(fig)
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.png'}")
