"""Bad checkpoints on load: refused by name on every rank, never half applied, never executed."""

import io
import json
import os
import zlib
from pathlib import Path

import msgspec
import pytest
import torch
from torch import nn

import zero_all as deepspeed
import zero_comm
from zero_ckpt import CheckpointError, CheckpointManager, FullTensor
from zero_ckpt._format import CheckpointMeta
from zero_ckpt._verify import seal_meta
from zero_comm.testing import run_ranks


class Piece:
    def __init__(self, start: int, stop: int, data: torch.Tensor):
        self.start, self.stop, self.data = start, stop, data


def state(rank: int, world: int, value: float | None = None) -> dict:
    out = {}
    for name, n in (("a", 40_000), ("b", 30_000), ("c", 30_000)):  # three pieces per rank
        chunk = n // world
        base = torch.arange(n, dtype=torch.float32) if value is None else torch.full((n,), value)
        out[name] = FullTensor((n,), torch.float32, [Piece(rank * chunk, (rank + 1) * chunk,
                                                           base[rank * chunk:(rank + 1) * chunk].clone())])
    return out


def save(root: str, tag: str, value: float | None = None) -> None:
    comm = zero_comm.init_distributed()
    CheckpointManager(root, comm, block_size=4096).save(tag, {"m": state(comm.rank, comm.world_size, value)},
                                                        client_state={"k": 1})


def load(root: str, tag: str) -> dict:
    """Load ``tag``; on a CheckpointError report it and whether the live state is untouched, then load 'good'."""
    comm = zero_comm.init_distributed()
    mine = state(comm.rank, comm.world_size, -1.0)
    manager = CheckpointManager(root, comm)
    try:
        manager.load({"m": mine}, tag)
        return {"error": None}
    except CheckpointError as exc:
        error = str(exc)
    untouched = all(torch.all(p.data == -1) for e in mine.values() for p in e.pieces)
    manager.load({"m": mine}, "good")
    good = all(torch.equal(p.data, torch.arange(p.start, p.stop, dtype=torch.float32))
               for e in mine.values() for p in e.pieces)
    return {"error": error, "untouched": untouched, "good": good}


def reseal(tag_dir: Path) -> None:
    """Fix up every checksum after an edit, so that only the checks a CRC cannot make can refuse it."""
    meta = msgspec.json.decode((tag_dir / "meta.json").read_bytes(), type=CheckpointMeta)
    for name in meta.ranks:
        m = json.loads((tag_dir / name).read_text())
        m["extra_checksum"] = zlib.crc32((tag_dir / m["extra_file"]).read_bytes())
        (tag_dir / name).write_text(json.dumps(m))
    meta = msgspec.structs.replace(meta, client_checksum=zlib.crc32((tag_dir / "client.pt").read_bytes()),
                                   manifest_checksums=[zlib.crc32((tag_dir / n).read_bytes()) for n in meta.ranks])
    (tag_dir / "meta.json").write_bytes(seal_meta(meta))


class Planted:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    run_ranks(save, 2, str(tmp_path), "good")
    run_ranks(save, 2, str(tmp_path), "bad")
    return tmp_path


@pytest.mark.parametrize("target", ["client.pt", "rank00001.extra"])
def test_a_planted_pickle_is_refused_and_never_runs(saved: Path, target: str):
    marker = saved / "pwned"
    buf = io.BytesIO()
    torch.save({"client_state": Planted(str(marker)), "items": {}} if target == "client.pt"
               else {"torch": Planted(str(marker)), "python": None}, buf)
    (saved / "bad" / target).write_bytes(buf.getvalue())
    reseal(saved / "bad")
    results = run_ranks(load, 2, str(saved), "bad")
    assert not marker.exists(), "the planted pickle ran"
    for r in results:
        assert target in r["error"] and "refused to unpickle" in r["error"]
        assert r["untouched"] and r["good"]


def edit_offset_digit(d: Path) -> str:
    m = json.loads((d / "rank00001.json").read_text())
    m["pieces"][1]["offset"] += 1000
    (d / "rank00001.json").write_text(json.dumps(m))
    return "rank00001.json"


def swap_offsets(d: Path) -> str:
    m = json.loads((d / "rank00001.json").read_text())
    m["pieces"][1]["offset"], m["pieces"][2]["offset"] = m["pieces"][2]["offset"], m["pieces"][1]["offset"]
    (d / "rank00001.json").write_text(json.dumps(m))
    return "rank00001.json"


def change_dtype(d: Path) -> str:
    raw = (d / "meta.json").read_text().replace('"dtype":"float32"', '"dtype":"int32"', 1)
    (d / "meta.json").write_text(raw)
    return "meta.json"


@pytest.mark.parametrize("edit", [edit_offset_digit, swap_offsets, change_dtype])
@pytest.mark.parametrize("fixed_up", [False, True])
def test_edited_metadata_fails_the_load_naming_the_file(saved: Path, edit, fixed_up: bool):
    named = edit(saved / "bad")
    if fixed_up:  # the CRCs hide the edit: the piece-by-piece checks still catch what they can
        if edit is swap_offsets:
            pytest.skip("equal pieces swapped are consistent data; only the manifest's checksum tells")
        reseal(saved / "bad")
    for r in run_ranks(load, 2, str(saved), "bad", timeout=60):
        assert r["error"] and named in r["error"], r
        assert r["untouched"] and r["good"]


def test_one_corrupt_shard_fails_every_rank_at_once_and_changes_nothing(saved: Path):
    data = saved / "bad" / "rank00001.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    results = run_ranks(load, 2, str(saved), "bad", timeout=60, collective_timeout=30)
    for r in results:
        assert "rank 1:" in r["error"] and "rank00001.data" in r["error"] and "checksum" in r["error"], r
        assert r["untouched"] and r["good"]
    assert results[0]["error"] == results[1]["error"], "every rank raises the same error"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("damage", "says"), [(truncate, "rank00001.data"), (Path.unlink, "rank00001.data is missing")],
                         ids=["truncated", "missing"])
def test_a_truncated_or_missing_shard_fails_every_rank_naming_the_file(saved: Path, damage, says: str):
    damage(saved / "bad" / "rank00001.data")
    results = run_ranks(load, 2, str(saved), "bad", timeout=60, collective_timeout=30)
    for r in results:
        assert r["error"] and says in r["error"], r
        assert r["untouched"] and r["good"]
    assert results[0]["error"] == results[1]["error"], "every rank raises the same error"


def test_a_missing_extra_is_a_checkpoint_error(saved: Path):
    (saved / "bad" / "rank00000.extra").unlink()
    for r in run_ranks(load, 2, str(saved), "bad", timeout=60):
        assert "rank00000.extra is missing" in r["error"] and r["untouched"]


# -- the engine: overwriting a tag ------------------------------------------------------------------------
def engine_overwrites(root: str) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.1}},
              "zero_optimization": {"stage": 1}}
    engine, *_ = deepspeed.initialize(model=model, config=config)

    def step() -> None:
        engine.backward(engine(torch.ones(2, 4)).square().sum())
        engine.step()

    step()
    assert engine.save_checkpoint(root, tag="t") is True
    step()
    second = {k: v.clone() for k, v in engine.module.state_dict().items()}
    engine.save_checkpoint(root, tag="t")  # the same tag again: replaced
    engine.save_checkpoint(root, tag="later")
    step()
    engine.load_checkpoint(root, tag="t")
    assert all(torch.equal(engine.module.state_dict()[k], v) for k, v in second.items())
    step()  # resumed from an older tag: train, save under that tag again
    engine.save_checkpoint(root, tag="t")
    after = {k: v.clone() for k, v in engine.module.state_dict().items()}
    step()
    engine.load_checkpoint(root)
    return {"latest": (Path(root) / "latest").read_text(),
            "same": all(torch.equal(engine.module.state_dict()[k], v) for k, v in after.items())}


def test_saving_to_an_existing_tag_replaces_it(tmp_path: Path):
    for r in run_ranks(engine_overwrites, 2, str(tmp_path), timeout=120):
        assert r["latest"] == "t" and r["same"]
    assert not list(tmp_path.glob("*.partial-*")), "nothing left aside"
