"""Activation memory of an 8-layer GPT with dropout: plain, checkpointed, CPU-offloaded, selective.

    python benchmarks/activations.py [--out benchmarks/results]

One process. For each way, the peak bytes allocated during the forward (the
profiler's allocation events, replayed), the bytes the checkpoints kept and where,
and whether loss and gradients equal the plain run bitwise. The baseline is the
same forward without checkpointing, in the same run. Target: the peak falls by
>= 40%. Writes ``activations.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from _common import goal

from zero_ckpt import ActivationCheckpointConfig, ActivationCheckpointing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "zero-ckpt" / "tests"))
from test_activation_checkpointing import GPT, make_tracker, run  # the test's model and measurement


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    idx = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    want_loss, want_grads, plain_peak = run(GPT(make_tracker()), None, idx)
    rows = {"plain": {"peak_bytes": plain_peak, "ratio": 1.0, "bitwise_equal": True}}
    print(f"{'way':<22}{'forward peak':>14}{'x plain':>9}{'kept':>10}{'to host':>10}  equal")
    print(f"{'plain':<22}{plain_peak:>14,}{1.0:>9.2f}{'':>10}{'':>10}  yes")
    for label, options in (("checkpointed", {}), ("cpu_checkpointing", {"cpu_checkpointing": True}),
                           ("selective (matmuls)", {"selective": ["matmul"]})):
        ckpt = ActivationCheckpointing(ActivationCheckpointConfig(**options), rng_tracker=make_tracker())
        loss, grads, peak = run(GPT(ckpt.rng_tracker), ckpt, idx)
        equal = loss == want_loss and all(torch.equal(a, b) for a, b in zip(grads, want_grads))
        rows[label] = {"peak_bytes": peak, "ratio": peak / plain_peak, "bitwise_equal": equal,
                       "kept_bytes": ckpt.stats.kept_bytes, "offloaded_bytes": ckpt.stats.offloaded_bytes}
        print(f"{label:<22}{peak:>14,}{peak / plain_peak:>9.2f}{ckpt.stats.kept_bytes:>10,}"
              f"{ckpt.stats.offloaded_bytes:>10,}  {'yes' if equal else 'NO'}")
    ok = rows["checkpointed"]["ratio"] <= 0.6 and all(r["bitwise_equal"] for r in rows.values())
    print("target (peak falls >= 40%, bitwise-equal gradients):", "met" if ok else "NOT met")
    args.out.mkdir(parents=True, exist_ok=True)
    goals = [goal("checkpointed forward peak / plain", rows["checkpointed"]["ratio"], 0.6)]
    (args.out / "activations.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows,
                                                           "target_met": ok, "goals": goals}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
