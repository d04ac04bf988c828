"""State checkpoints: written by N ranks, read by M; atomic under SIGKILL; verified; async; exported."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import zero_ckpt
import zero_comm
from zero_ckpt import CheckpointError, CheckpointManager, FullTensor, consolidate, export, latest_tag
from zero_comm.testing import run_ranks

SHAPES = {"w": ((37, 11), torch.float32), "b": ((5,), torch.bfloat16), "steps": ((3, 4), torch.int64),
          "big": ((1000, 300), torch.float32)}


def reference_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, (shape, dtype) in SHAPES.items():
        t = torch.randn(shape, generator=g) * 10
        out[name] = t.to(dtype)
    return out


class Piece:
    def __init__(self, start: int, stop: int, data: torch.Tensor):
        self.start, self.stop, self.data = start, stop, data


def sharded(tensors: dict[str, torch.Tensor], rank: int, world: int, fill: float | None = None) -> dict:
    """Rank ``rank``'s slice of every tensor, ZeRO style: the flattened tensor cut in ``world`` chunks
    (a rank can hold nothing of a small one). With ``fill`` the pieces are fresh tensors to load into."""
    out = {}
    for name, t in tensors.items():
        flat = t.reshape(-1)
        chunk = -(-flat.numel() // world)
        start, stop = min(rank * chunk, flat.numel()), min((rank + 1) * chunk, flat.numel())
        data = flat[start:stop].clone() if fill is None else torch.full((stop - start,), fill).to(t.dtype)
        out[name] = FullTensor(tuple(t.shape), t.dtype, [Piece(start, stop, data)] if stop > start else [])
    return out


def save_sharded(root: str, tag: str) -> None:
    comm = zero_comm.init_distributed()
    state = sharded(reference_tensors(), comm.rank, comm.world_size)
    torch.manual_seed(100 + comm.rank)
    CheckpointManager(root, comm).save(tag, {"model": state}, client_state={"note": "hi", "rank0": comm.rank})


def load_sharded(root: str) -> dict:
    comm = zero_comm.init_distributed()
    want = reference_tensors()
    state = sharded(want, comm.rank, comm.world_size, fill=-1.0)
    client = CheckpointManager(root, comm).load({"model": state})
    ok = all(torch.equal(p.data, want[n].reshape(-1)[p.start:p.stop]) for n, e in state.items() for p in e.pieces)
    return {"ok": ok, "client": client, "rand": torch.rand(3)}


@pytest.mark.parametrize("saved, loaded", [(2, 4), (4, 1), (1, 2), (2, 2)])
def test_checkpoints_reshard_between_world_sizes(tmp_path, saved, loaded):
    run_ranks(save_sharded, saved, str(tmp_path), "t1")
    results = run_ranks(load_sharded, loaded, str(tmp_path))
    assert all(r["ok"] for r in results), "every loading rank got exactly its elements"
    assert results[0]["client"] == {"note": "hi", "rank0": 0}
    if saved == loaded:  # each rank's RNG is where it was when it saved
        for rank, r in enumerate(results):
            torch.manual_seed(100 + rank)
            assert torch.equal(r["rand"], torch.rand(3))
    assert latest_tag(tmp_path) == "t1"
    whole = consolidate(tmp_path, prefix="model/")
    assert all(torch.equal(whole[n], t) for n, t in reference_tensors().items()), "consolidated without ranks"


def replicated_save(root: str) -> None:
    comm = zero_comm.init_distributed()
    module = torch.nn.Linear(4, 3)
    torch.nn.init.constant_(module.weight, 1.5)
    CheckpointManager(root, comm).save("r", {"model": zero_ckpt.module_state(module)})


def test_replicated_state_is_written_once_and_loads_into_a_plain_module(tmp_path):
    run_ranks(replicated_save, 2, str(tmp_path))
    reader = zero_ckpt.CheckpointReader(tmp_path)
    assert sum(len(m.pieces) for m in reader.manifests) == 2, "weight and bias written by rank 0 only"
    module = torch.nn.Linear(4, 3)
    comm_free = consolidate(tmp_path, prefix="model/")
    module.load_state_dict(comm_free)
    assert torch.equal(module.weight, torch.full((3, 4), 1.5))


SAVER = textwrap.dedent("""
    import sys, torch, zero_comm
    from zero_ckpt import CheckpointManager, FullTensor
    class P:
        def __init__(self, t): self.start, self.stop, self.data = 0, t.numel(), t.reshape(-1)
    comm = zero_comm.init_distributed()
    root = sys.argv[1]
    small = torch.arange(10, dtype=torch.float32)
    manager = CheckpointManager(root, comm)
    manager.save("good", {"m": {"x": FullTensor((10,), torch.float32, [P(small)])}})
    print("saved good", flush=True)
    big = torch.randn(150_000_000 // 4 * 4)  # 600 MB: seconds of writing and fsync
    manager.save("doomed", {"m": {"x": FullTensor((10,), torch.float32, [P(small * 0)]),
                                  "y": FullTensor(tuple(big.shape), torch.float32, [P(big)])}})
    print("saved doomed", flush=True)
""")


def test_a_saver_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + random.randrange(900)), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0")
    root = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(root)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "saved good" in proc.stdout.readline()
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in root.glob("doomed.partial-*/rank00000.data")):
            assert time.monotonic() < deadline and proc.poll() is None, "the second save never started writing"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "killed while writing, not after"
    assert latest_tag(root) == "good" and not (root / "doomed").exists()
    assert torch.equal(consolidate(root, prefix="m/")["x"], torch.arange(10, dtype=torch.float32))


def single_save(root: str, async_save: bool) -> float:
    comm = zero_comm.init_distributed()
    t = reference_tensors()
    manager = CheckpointManager(root, comm)
    manager.save("a", {"m": sharded(t, 0, 1)}, async_save=async_save)
    return manager.last_save_blocked_s


def test_corruption_and_truncation_fail_the_load_naming_the_file(tmp_path):
    run_ranks(single_save, 1, str(tmp_path), False)
    data = tmp_path / "a" / "rank00000.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"rank00000\.data: block \d+ .* fails its checksum"):
        consolidate(tmp_path, prefix="m/")
    data.write_bytes(bytes(raw[: len(raw) // 3]))
    with pytest.raises(CheckpointError, match=r"rank00000\.data is \d+ bytes; its manifest says"):
        consolidate(tmp_path, prefix="m/")
    data.unlink()
    with pytest.raises(CheckpointError, match=r"rank00000\.data is missing: .* is not a complete checkpoint"):
        consolidate(tmp_path, prefix="m/")
    (tmp_path / "a" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"meta\.json is corrupted"):
        consolidate(tmp_path, prefix="m/")
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        consolidate(tmp_path / "elsewhere")


def async_then_change(root: str) -> dict:
    comm = zero_comm.init_distributed()
    t = reference_tensors()
    state = sharded(t, 0, 1)
    manager = CheckpointManager(root, comm)
    manager.save("a", {"m": state}, async_save=True)
    for entry in state.values():  # training goes on and changes the live state
        for p in entry.pieces:
            p.data.zero_()
    manager.wait()
    return {"blocked": manager.last_save_blocked_s}


def test_async_save_writes_the_state_as_it_was_when_called(tmp_path):
    run_ranks(async_then_change, 1, str(tmp_path))
    whole = consolidate(tmp_path, prefix="m/")
    assert all(torch.equal(whole[n], t) for n, t in reference_tensors().items())


def test_export_writes_a_state_dict_plain_torch_loads(tmp_path):
    run_ranks(save_sharded, 2, str(tmp_path), "e")
    out = export(tmp_path, tmp_path / "weights.pt", prefix="model/", dtype=torch.bfloat16)
    loaded = torch.load(out)
    assert set(loaded) == set(SHAPES)
    assert {n: v.dtype for n, v in loaded.items()} == {"w": torch.bfloat16, "b": torch.bfloat16, "big": torch.bfloat16,
                                                       "steps": torch.int64}, "dtype= converts floats only"
    assert torch.equal(loaded["w"], reference_tensors()["w"].to(torch.bfloat16))
    assert torch.equal(loaded["steps"], reference_tensors()["steps"])


def bad_saves(root: str) -> None:
    comm = zero_comm.init_distributed()
    state = {"m": sharded(reference_tensors(), 0, 1)}
    blocked = Path(root) / "a-file"
    blocked.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoints to"):
        CheckpointManager(blocked / "sub", comm).save("t", state)
    manager = CheckpointManager(Path(root) / "ok", comm)
    for tag in ("", "a/b", "latest", ".hidden"):
        with pytest.raises(CheckpointError, match="bad checkpoint tag"):
            manager.save(tag, state)
    manager.save("t", state)
    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        manager.save("t", state)
    manager.save("t", state, overwrite=True)
    gap = {"m": {"w": FullTensor((4, 4), torch.float32, [Piece(0, 10, torch.zeros(10))])}}
    with pytest.raises(CheckpointError, match=r"m/w: no rank holds elements \[10, 16\)"):
        manager.save("gap", gap)
    wrong = {"m": {"w": FullTensor((4, 4), torch.float32, [Piece(0, 16, torch.zeros(16))])}}
    with pytest.raises(CheckpointError, match=r"m/w: the checkpoint holds shape \(37, 11\), this model \(4, 4\)"):
        manager.load(wrong)
    with pytest.raises(CheckpointError, match="has no tensor 'm/ww'; did you mean 'm/w'"):
        manager.load({"m": {"ww": FullTensor((37, 11), torch.float32, [])}})


def test_bad_input_is_named(tmp_path):
    run_ranks(bad_saves, 1, str(tmp_path))


def overwrite_interrupted(root: str) -> bool:
    comm = zero_comm.init_distributed()
    manager = CheckpointManager(root, comm)
    manager.save("t", {"m": sharded(reference_tensors(), 0, 1)})
    os.rename(Path(root) / "t", Path(root) / "t.partial-old-dead")  # an overwrite died between its two renames
    assert latest_tag(root) == "t.partial-old-dead", "the moved-aside copy is still found"
    assert torch.equal(consolidate(root, prefix="m/")["w"], reference_tensors()["w"])
    manager.save("u", {"m": sharded(reference_tensors(), 0, 1)})  # the next save puts it back
    assert (Path(root) / "t" / "meta.json").is_file() and not list(Path(root).glob("*.partial-*"))
    # a load that cannot complete changes nothing
    state = sharded(reference_tensors(), 0, 1, fill=-1.0)
    state["extra"] = FullTensor((2,), torch.float32, [Piece(0, 2, torch.zeros(2))])
    with pytest.raises(CheckpointError, match="has no tensor 'm/extra'"):
        manager.load({"m": state})
    return all(torch.all(p.data == -1) for e in state.values() if e.global_shape != (2,) for p in e.pieces)


def test_an_interrupted_overwrite_is_recovered_and_a_failed_load_changes_nothing(tmp_path):
    assert run_ranks(overwrite_interrupted, 1, str(tmp_path))[0]
