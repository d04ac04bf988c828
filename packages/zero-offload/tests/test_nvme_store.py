"""NVMeStore: what is put comes back, within the buffer budget, and failures are loud and clean."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from zero_offload import NVMeStore, SwapIOError, sweep_orphans
from zero_offload._nvme import OWNER

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


def _value(numel: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g).to(dtype)
    return torch.randint(-(2**40), 2**40, (numel,), generator=g, dtype=dtype)


@pytest.mark.parametrize("direct", [None, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_what_is_created_and_put_comes_back_from_disk(tmp_path: Path, dtype: torch.dtype, direct: bool | None):
    with NVMeStore(tmp_path, buffer_bytes=1 << 20, direct=direct, block_bytes=8192) as store:
        values = {f"t{n}": _value(n, dtype, seed=n) for n in (1, 1000, 4099, 20_000)}
        for key, v in values.items():
            store.create(key, v)
        store.drop_cache()  # nothing cached: every get reads its file
        for key, v in values.items():
            got = store.get(key)
            assert got.dtype == dtype and torch.equal(got, v)
            got.copy_(_value(v.numel(), dtype, seed=99))
            store.put(key, got)
        store.drop_cache()
        for key, v in values.items():
            assert torch.equal(store.get(key), _value(v.numel(), dtype, seed=99))
            store.release(key)


def test_o_direct_is_used_where_the_filesystem_allows_it(tmp_path: Path):
    with NVMeStore(tmp_path) as store:
        flag = getattr(os, "O_DIRECT", 0)
        try:
            os.close(os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT | flag))
            expected = bool(flag)
        except OSError:
            expected = False
        assert store.direct is expected
        store.create("x", torch.arange(10.0))
        assert torch.equal(store.get("x"), torch.arange(10.0))


def test_buffers_never_exceed_the_budget_and_prefetch_reads_ahead(tmp_path: Path):
    mib = 1 << 20
    with NVMeStore(tmp_path, buffer_bytes=3 * mib, block_bytes=256 << 10) as store:
        keys = [f"layer{i}" for i in range(12)]
        for i, key in enumerate(keys):
            store.create(key, torch.full((mib // 4,), float(i)))
        store.flush()
        store.drop_cache()
        for step in range(3):
            store.prefetch(keys)
            for i, key in enumerate(keys):
                t = store.get(key)
                assert torch.all(t == i + step)
                t.add_(1)
                store.put(key, t)
            store.flush()
        stats = store.stats
        assert stats.peak_buffer_bytes <= 3 * mib
        assert stats.reads_prefetched > stats.reads_on_demand  # most reads were under way when asked for
        assert stats.bytes_written >= 4 * len(keys) * mib  # created once, written back three times


def test_a_borrowed_set_larger_than_the_budget_is_refused_by_name(tmp_path: Path):
    with NVMeStore(tmp_path, buffer_bytes=2 << 20) as store:
        for i in range(3):
            store.create(f"state{i}", torch.zeros(1 << 18))
        store.get("state0")
        store.get("state1")
        with pytest.raises(MemoryError, match=r"cannot hold 'state2'.*state0, state1.*buffer_bytes"):
            store.get("state2")
        store.release("state0")
        assert torch.all(store.get("state2") == 0)


def test_put_of_the_wrong_size_or_dtype_is_refused(tmp_path: Path):
    with NVMeStore(tmp_path) as store:
        store.create("w", torch.zeros(10))
        with pytest.raises(ValueError, match="put 'w': got 11 elements"):
            store.put("w", torch.zeros(11))
        with pytest.raises(ValueError, match=r"torch\.float16"):
            store.put("w", torch.zeros(10, dtype=torch.float16))
        with pytest.raises(KeyError, match="no state named 'v'"):
            store.get("v")


def test_a_missing_path_is_created_and_an_unusable_one_refused_before_anything_is_written(tmp_path: Path):
    with NVMeStore(tmp_path / "missing" / "swap") as store:  # as DeepSpeed does: made, parents too
        store.create("x", torch.ones(10))
        assert store.directory.parent == tmp_path / "missing" / "swap"
    with pytest.raises(PermissionError, match=r"NVMe offload path /proc/zero-swap-test does not exist and cannot be "
                                              r"created"):
        NVMeStore("/proc/zero-swap-test")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        NVMeStore(tmp_path / "file")
    with pytest.raises(PermissionError, match="not writable"):
        NVMeStore("/proc")


def test_more_state_than_free_space_is_refused_before_writing(tmp_path: Path):
    with NVMeStore(tmp_path) as store:
        free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
        with pytest.raises(OSError, match=r"GiB free; the offloaded state needs"):
            store.reserve(free + (1 << 40))
        assert [p.name for p in store.directory.iterdir()] == [OWNER]  # only its owner's lock


def test_a_truncated_swap_file_is_an_error_naming_the_file_not_wrong_weights(tmp_path: Path):
    with NVMeStore(tmp_path) as store:
        store.create("master", torch.randn(50_000))
        store.flush()
        store.drop_cache()
        path = store._swap.entries["master"].path
        os.truncate(path, 4096)
        with pytest.raises(SwapIOError, match=str(path.name)):
            store.get("master")
        with pytest.raises(SwapIOError):  # and again: no half-read buffer is ever handed out
            store.get("master")


def test_swap_files_are_removed_on_close_on_collection_and_at_exit_after_an_error(tmp_path: Path):
    store = NVMeStore(tmp_path)
    store.create("x", torch.zeros(100))
    directory = store.directory
    assert any(directory.iterdir())
    store.close()
    assert not directory.exists()

    store = NVMeStore(tmp_path)
    store.create("x", torch.zeros(100))
    directory = store.directory
    del store
    gc.collect()
    assert not directory.exists()

    script = (f"import torch, zero_offload; s = zero_offload.NVMeStore({str(tmp_path)!r}); "
              "s.create('x', torch.zeros(1000)); print(s.directory, flush=True); raise RuntimeError('training failed')")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode != 0 and "training failed" in run.stderr
    assert not Path(run.stdout.strip()).exists()
    assert not list(tmp_path.glob("zero-swap-*"))


def test_async_handles_read_ahead_and_confirm_writes(tmp_path: Path):
    with NVMeStore(tmp_path, buffer_bytes=4 << 20) as store:
        for i in range(4):
            store.create(f"k{i}", torch.full((1 << 18,), float(i)))
        store.drop_cache()
        handles = [store.get_async(f"k{i}") for i in range(3)]  # three reads under way at once
        assert store.stats.bytes_read == 3 << 20
        for i, h in enumerate(handles):
            t = h.wait()
            assert torch.all(t == i)
            t.add_(10)
            store.put_async(f"k{i}", t).wait()
        store.drop_cache()
        assert [store.get(f"k{i}")[0].item() for i in range(3)] == [10.0, 11.0, 12.0]


def test_a_read_that_could_not_start_never_hands_out_its_buffer(tmp_path: Path):
    with NVMeStore(tmp_path, buffer_bytes=1 << 20) as store:
        store.create("w", torch.full((1000,), 7.0))
        store.create("other", torch.full((1000,), 123.0))
        store.get("other")
        store.release("other")
        store.drop_cache()
        path = store._swap.entries["w"].path
        path.rename(tmp_path / "moved")
        with pytest.raises(SwapIOError, match="cannot open swap file"):
            store.get("w")
        (tmp_path / "moved").rename(path)
        assert torch.all(store.get("w") == 7.0)  # read again from the file, not a recycled buffer


def test_reads_ahead_give_way_to_a_demand_and_their_errors_stay_with_their_key(tmp_path: Path):
    with NVMeStore(tmp_path, buffer_bytes=3 * 4096 * 4) as store:
        for i in range(6):
            store.create(f"k{i}", torch.full((4096,), float(i)))
        store.drop_cache()
        store.prefetch(["k3", "k4", "k5"])  # the whole budget read ahead
        assert torch.all(store.get("k0") == 0)  # a demand takes a read-ahead buffer, no MemoryError
        store.release("k0")
        store.drop_cache()
        os.truncate(store._swap.entries["k5"].path, 4096)
        store.prefetch(["k4", "k5"])
        assert torch.all(store.get("k4") == 4)  # k5's failure is not k4's
        assert store._swap.held() == ["k4"]
        store.release("k4")
        with pytest.raises(SwapIOError, match="k5"):
            store.get("k5")


def test_a_key_borrowed_twice_stays_until_both_borrows_end(tmp_path: Path):
    with NVMeStore(tmp_path, buffer_bytes=2 * 4096 * 4) as store:
        for i in range(4):
            store.create(f"k{i}", torch.full((4096,), float(i)))
        a = store.get("k0")
        store.get("k0")
        store.release("k0")
        for i in (1, 2, 3):  # room is made from other keys, never from k0
            store.get(f"k{i}")
            store.release(f"k{i}")
        assert torch.all(a == 0)
        store.release("k0")
        assert store._swap.held() == []


def test_a_closed_store_says_so_and_reservations_add_up(tmp_path: Path):
    store = NVMeStore(tmp_path)
    store.create("x", torch.zeros(10))
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    store.reserve(free * 2 // 3)
    with pytest.raises(OSError, match="free; the offloaded state needs"):
        store.reserve(free * 2 // 3)  # together they do not fit
    store.close()
    with pytest.raises(RuntimeError, match="was closed"):
        store.get("x")


KILLED = """
import os, signal, sys, torch, zero_offload
s = zero_offload.NVMeStore(sys.argv[1])
s.create("x", torch.zeros(1000))
s.flush()
print(s.directory, flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)  # no finaliser, no atexit: the files stay behind
sys.stdin.read()  # "live": hold the store until told to go
"""


def test_swap_files_of_a_killed_process_are_removed_by_the_next_store_and_a_live_ones_kept(tmp_path: Path):
    def killed() -> Path:
        run = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path), "kill"], capture_output=True, text=True,
                             timeout=120, check=False)
        assert run.returncode == -9
        return Path(run.stdout.strip())

    live = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path), "live"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        held = Path(live.stdout.readline().strip())  # type: ignore[union-attr]
        orphan = killed()
        assert any(orphan.iterdir())
        assert sweep_orphans(tmp_path) == [orphan]  # held's lock is taken: not touched
        assert not orphan.exists() and held.exists()
        orphan = killed()
        with NVMeStore(tmp_path) as store:  # opening a store sweeps too
            assert not orphan.exists() and held.exists()
            mine = store.directory
        assert not mine.exists()
    finally:
        live.communicate("", timeout=60)
    assert not held.exists()  # the live one cleaned up after itself on exit
    assert not list(tmp_path.glob("zero-swap-*"))


def test_a_deleted_key_loses_its_file_and_buffer_but_not_while_borrowed(tmp_path: Path):
    with NVMeStore(tmp_path, buffer_bytes=2 * 4096) as store:
        for key in ("a/", "a_", "b"):  # "a/" and "a_" share a file name once sanitised
            store.create(key, torch.full((1000,), float(len(key))))
        store.get("b")
        with pytest.raises(RuntimeError, match="cannot delete 'b': it is borrowed"):
            store.delete("b")
        store.release("b")
        store.prefetch(["a/", "b"])  # reads in flight or queued are finished or dropped
        store.delete("a/")
        store.delete("b")
        assert store.keys() == ["a_"] and len(list(store.directory.glob("*.swp"))) == 1
        store.create("a/", torch.arange(1000.0))  # a fresh file: no clash with the one of "a_"
        store.drop_cache()
        assert torch.equal(store.get("a/"), torch.arange(1000.0))
        assert torch.equal(store.get("a_"), torch.full((1000,), 2.0))
        assert store.stats.peak_buffer_bytes <= 2 * 4096


def test_a_store_being_opened_is_never_taken_for_an_orphan_by_a_sweep_beside_it(tmp_path: Path):
    # Two ranks share one NVMe path: each store sweeps the path as it opens. A sweep that met a new
    # store's lock file before the store had locked it took the lock (and the directory) from it.
    stop = threading.Event()
    swept: list[Path] = []

    def sweep() -> None:
        while not stop.is_set():
            swept.extend(sweep_orphans(tmp_path))

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    try:
        for _ in range(300):
            with NVMeStore(tmp_path, buffer_bytes=1 << 16) as store:
                assert store.directory.exists()
    finally:
        stop.set()
        sweeper.join()
    assert swept == []  # every store was alive, and locked, whenever a sweep could see it
    assert not list(tmp_path.glob("zero-swap-*"))
