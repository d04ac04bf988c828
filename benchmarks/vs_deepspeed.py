"""The same DeepSpeed script under DeepSpeed and under zero, side by side: losses and wall time.

    nox -s deepspeed            # installs deepspeed==0.19.8 next to zero, then runs this
    python benchmarks/vs_deepspeed.py [--python PY_WITH_DEEPSPEED] [--steps 6]

integration-tests/deepspeed_script.py is run twice per config on 2 CPU ranks: once as
written (``import zero_all as deepspeed``, launched by ``zero run``) and once with that
line changed to ``import deepspeed`` (launched by torch.distributed.run with
``DS_ACCELERATOR=cpu``), nothing else changed. The script saves a checkpoint halfway,
rebuilds its engine and loads it, so the comparison covers save and load too. Reports the
largest relative difference between the two loss curves and the ratio of wall times (zero
over DeepSpeed; whole launches of a few steps, so mostly start-up). DeepSpeed's Adam is
asked for as torch's (``torch_adam``) so that nothing has to be compiled. Writes
``vs_deepspeed.json``. DeepSpeed is never a dependency of zero: only this optional
benchmark installs it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "integration-tests" / "deepspeed_script.py"

BASE = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "steps_per_print": 100,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True}},
        "gradient_clipping": 1.0}
WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 3e-3, "warmup_num_steps": 4}}
CONFIGS = {
    "stage0": {"zero_optimization": {"stage": 0}},
    "stage1 + WarmupLR": {"zero_optimization": {"stage": 1}, "scheduler": WARMUP},
    "stage2": {"zero_optimization": {"stage": 2}},
    "stage3 + WarmupLR": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100},
                          "scheduler": WARMUP},
}


def run(cmd: list[str], env: dict[str, str], out: Path) -> tuple[list[float], float, int]:
    """The loss curve, the wall time and the exit status. A run that wrote its losses and then died
    at exit (Gloo threads outliving the interpreter abort a process with SIGABRT) is reported, not
    dropped; any other failure stops the benchmark."""
    began = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    elapsed = time.perf_counter() - began
    losses = out / "losses.json"
    if done.returncode and not (losses.exists() and "terminate called" in done.stderr):
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(losses.read_text())["losses"], elapsed, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="a Python with deepspeed and zero installed")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    version = subprocess.run([args.python, "-c", "import deepspeed; print(deepspeed.__version__)"],
                             capture_output=True, text=True, check=False,
                             env={**os.environ, "DS_ACCELERATOR": "cpu"}).stdout.strip().splitlines()
    if not version:
        raise SystemExit(f"{args.python} cannot import deepspeed: run `nox -s deepspeed`, or pass --python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        as_deepspeed = work / "deepspeed_script.py"
        text = SCRIPT.read_text().replace("import zero_all as deepspeed\n", "import deepspeed\n")
        as_deepspeed.write_text(text.replace('Path(__file__).resolve().parents[1] / "examples"',
                                             repr(str(ROOT / "examples"))))
        for name, extra in CONFIGS.items():
            config = work / f"{len(rows)}.json"
            config.write_text(json.dumps({**BASE, **extra}))
            common = ["--deepspeed", "--deepspeed_config", str(config), "--steps", str(args.steps),
                      "--save-at", str(args.steps // 2)]
            ds_out, zero_out = work / f"ds{len(rows)}", work / f"zero{len(rows)}"
            ds_out.mkdir()
            zero_out.mkdir()
            ds, ds_s, ds_rc = run([args.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(as_deepspeed), *common, "--out", str(ds_out)], env, ds_out)
            zero, zero_s, zero_rc = run([args.python, "-m", "zero_all", "run", "--nproc", "2", str(SCRIPT), *common,
                                "--out", str(zero_out)], env, zero_out)
            worst = max(abs(a - b) / abs(b) for a, b in zip(zero, ds, strict=True))
            rows.append({"config": name, "deepspeed_losses": ds, "zero_losses": zero, "max_rel_diff": worst,
                         "deepspeed_s": ds_s, "zero_s": zero_s, "time_ratio": zero_s / ds_s,
                         "deepspeed_exit": ds_rc, "zero_exit": zero_rc})
            aborted = "".join(f"; {who} aborted at exit ({rc})" for who, rc in (("DeepSpeed", ds_rc), ("zero", zero_rc))
                              if rc)
            print(f"{name:20s} losses differ by at most {worst:.1e} (rel); wall time zero/DeepSpeed "
                  f"{zero_s / ds_s:.2f} ({zero_s:.0f} s / {ds_s:.0f} s){aborted}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vs_deepspeed.json").write_text(json.dumps(
        {"deepspeed": version[-1], "world_size": 2, "steps": args.steps, "rows": rows}, indent=1))
    print(f"DeepSpeed {version[-1]}; wrote {args.out / 'vs_deepspeed.json'}")


if __name__ == "__main__":
    main()
