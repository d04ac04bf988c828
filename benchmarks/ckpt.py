"""State checkpoint throughput against plain file I/O of the same bytes, and async save's blocking time.

    python benchmarks/ckpt.py [--world-size 2] [--mib 256] [--rounds 3] [--out benchmarks/results]

Each of ``world_size`` Gloo ranks holds ``mib / world_size`` MiB of fp32 shards (8
tensors, ZeRO-style flat pieces). Interleaved, ``rounds`` times, in one directory:

- plain write: each rank writes its bytes to one file and fsyncs it -- the baseline;
- zero-ckpt save (sync): data + manifest + checksums, fsync, atomic commit, ``latest``;
- zero-ckpt save of a ZeRO stage-1 optimizer's state (about ``mib`` MiB of fp32 master
  weights and Adam moments), sync, and async in a training loop: how long the loop is
  held up, by ``save`` itself and by the next ``step`` waiting for the state's copy;
- torch.distributed.checkpoint (DCP) save of the same tensors, for the storage decision;
- plain read (``readinto`` of each rank's file), zero-ckpt load, DCP load, each with
  the files dropped from the page cache first (``posix_fadvise``): reads come from storage.

The slowest rank's time counts. Writes ``ckpt.json``. Targets: save and load at
>= 80% of plain I/O's throughput; async save blocks for <= 10% of a sync save.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import goal

import zero_ckpt
import zero_comm
from zero_comm.testing import run_ranks


class _Piece:
    def __init__(self, start: int, stop: int, data: torch.Tensor):
        self.start, self.stop, self.data = start, stop, data


def measure(root: str, mib: int, rounds: int) -> dict:
    import torch.distributed.checkpoint as dcp

    comm = zero_comm.init_distributed()
    per_tensor = mib * 2**20 // 4 // 8 // comm.world_size
    tensors = [torch.randn(per_tensor) for _ in range(8)]
    nbytes = sum(t.numel() * 4 for t in tensors)
    state = {f"t{i}": zero_ckpt.FullTensor((per_tensor * comm.world_size,), torch.float32,
                                           [_Piece(comm.rank * per_tensor, (comm.rank + 1) * per_tensor, t)])
             for i, t in enumerate(tensors)}
    manager = zero_ckpt.CheckpointManager(Path(root) / "zero", comm)
    plain = Path(root) / f"plain{comm.rank}.bin"
    times: dict[str, list[float]] = {k: [] for k in ("plain_write", "save", "opt_save", "async_blocked",
                                                     "dcp_save", "plain_read", "load", "dcp_load")}
    from torch import nn

    from zero_optim import AdamW, ZeroConfig, ZeroOptimizer

    width = int((mib * 2**20 / 12 / 10) ** 0.5)  # ten square layers: ~mib MiB of master + two moments
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(10)])
    opt = ZeroOptimizer(model.named_parameters(), AdamW(), comm=comm, config=ZeroConfig(stage=1))
    x = torch.randn(8, width)

    def train_step() -> None:
        opt.backward(model(x).square().mean())
        opt.step()

    train_step()

    def timed(key: str, fn) -> None:
        comm.barrier()
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        comm.all_reduce(elapsed, "max")
        times[key].append(elapsed.item())

    def plain_write() -> None:
        with open(plain, "wb") as f:
            for t in tensors:
                f.write(zero_ckpt._format.as_bytes(t))
            f.flush()
            os.fsync(f.fileno())

    def evict() -> None:
        """Drop this rank's checkpoint files from the page cache: reads come from storage, as a resumed job's
        do (the files are fsynced, so their pages are clean and can go)."""
        for path in Path(root).rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)

    def plain_read() -> None:
        with open(plain, "rb") as f:
            for t in tensors:
                f.readinto(zero_ckpt._format.as_bytes(t))

    def async_save_in_training() -> None:
        comm.barrier()
        manager.save("opt-async", {"optim": opt}, async_save=True, overwrite=True)
        train_step()  # the training loop goes on; its step waits until the state is copied
        times["async_blocked"].append(manager.last_save_blocked_s + manager.last_step_wait_s)
        manager.wait()

    dcp_dir = Path(root) / "dcp"
    dcp_state = {f"r{comm.rank}.t{i}": t for i, t in enumerate(tensors)}
    for _ in range(rounds):
        timed("plain_write", plain_write)
        timed("save", lambda: manager.save("sync", {"m": state}, overwrite=True))
        timed("opt_save", lambda: manager.save("opt-sync", {"optim": opt}, overwrite=True))
        async_save_in_training()
        if comm.rank == 0:
            shutil.rmtree(dcp_dir, ignore_errors=True)
        comm.barrier()
        timed("dcp_save", lambda: dcp.save(dcp_state, checkpoint_id=dcp_dir))
        evict()
        timed("plain_read", plain_read)
        evict()
        timed("load", lambda: manager.load({"m": state}, tag="sync", restore_rng=False))
        evict()
        timed("dcp_load", lambda: dcp.load(dcp_state, checkpoint_id=dcp_dir))
    blocked = torch.tensor(times["async_blocked"], dtype=torch.float64)
    comm.all_reduce(blocked, "max")  # the slowest rank's, as for the other timings
    times["async_blocked"] = blocked.tolist()
    return {"bytes": nbytes * comm.world_size, "times": times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="zero-ckpt-bench-", dir=args.dir))
    try:
        print(f"{args.mib} MiB of fp32 shards over {args.world_size} Gloo ranks, {args.rounds} rounds, in {root}",
              flush=True)
        result = run_ranks(measure, args.world_size, str(root), args.mib, args.rounds, timeout=3600)[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in result["times"].items()}
    gb = result["bytes"] / 1e9
    rows = [("plain write + fsync", "plain_write", None), ("zero-ckpt save", "save", "plain_write"),
            ("DCP save", "dcp_save", "plain_write"), ("plain read", "plain_read", None),
            ("zero-ckpt load", "load", "plain_read"), ("DCP load", "dcp_load", "plain_read")]
    print(f"{'way':<22}{'s':>8}{'GB/s':>8}{'of plain':>10}")
    ratios = {}
    for label, key, base in rows:
        ratio = med[base] / med[key] if base else 1.0
        ratios[key] = ratio
        print(f"{label:<22}{med[key]:>8.3f}{gb / med[key]:>8.2f}{ratio:>10.0%}")
    blocked = statistics.median(result["times"]["async_blocked"]) / med["opt_save"]
    print(f"optimizer state: sync save {med['opt_save']:.3f} s; async save holds the training loop for "
          f"{statistics.median(result['times']['async_blocked']):.3f} s = {blocked:.1%} of it")
    ok = ratios["save"] >= 0.8 and ratios["load"] >= 0.8 and blocked <= 0.1
    print("targets (save and load >= 80% of plain, async blocking <= 10%):", "met" if ok else "NOT met")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ckpt.json").write_text(json.dumps({
        "meta": {"world_size": args.world_size, "mib": args.mib, "rounds": args.rounds, "torch": torch.__version__},
        "goals": [goal("zero-ckpt save throughput / plain write", ratios["save"], 0.8, "higher"),
                  goal("zero-ckpt load throughput / plain read", ratios["load"], 0.8, "higher"),
                  goal("async save: loop held / sync save", blocked, 0.1)],
        "median_s": med, "fraction_of_plain": ratios, "async_blocked_fraction": blocked, "targets_met": ok,
        "times": result["times"]}, indent=1))
    print(f"wrote {args.out / 'ckpt.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
