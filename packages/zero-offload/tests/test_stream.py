"""LayerStreamer: a model whose layers live in a store gives the same outputs as the model in memory,
holding only the running layer's weights (plus the store's bounded buffers) while it runs."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from zero_offload import ALIGN, HostStore, LayerStreamer, NVMeStore, SwapIOError

D, H, VOCAB, DEPTH = 128, 1024, 64, 6


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(VOCAB, D), *[Block() for _ in range(DEPTH)])


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


LAYER = nbytes(Block().parameters())  # 1.0 MiB of fp32 per block
EMBED = VOCAB * D * 4
PADDED = -(-LAYER // ALIGN) * ALIGN  # a layer's flat in an NVMe buffer


def tokens(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(step))


def make_store(kind: str, tmp_path: Path, layers: int = 2):
    return HostStore() if kind == "host" else NVMeStore(tmp_path, buffer_bytes=layers * PADDED)


@pytest.mark.parametrize("kind,prefetch", [("host", 1), ("nvme", 0), ("nvme", 1), ("nvme", 2)])
def test_streamed_outputs_equal_the_in_memory_model_token_after_token(tmp_path: Path, kind: str, prefetch: int):
    reference, model = make_model(), make_model()
    store = make_store(kind, tmp_path, layers=1 + prefetch)
    with LayerStreamer(model[1:], store, prefetch=prefetch), torch.no_grad():
        for step in range(4):  # each forward runs the stack again, from the wrapped-around read ahead
            assert torch.equal(model(tokens(step)), reference(tokens(step)))
    if kind == "nvme":
        assert store.stats.peak_buffer_bytes <= (1 + prefetch) * PADDED
        assert (store.stats.reads_prefetched > 0) == (prefetch > 0)
        store.close()


def test_layers_of_mixed_dtypes_stream_as_one_flat_per_dtype(tmp_path: Path):
    reference, model = make_model(), make_model()
    for m in (reference, model):
        m[2].fc1.to(torch.bfloat16)
        m[2].fc1.register_forward_pre_hook(lambda mod, args: (args[0].to(torch.bfloat16),))
        m[2].fc1.register_forward_hook(lambda mod, args, out: out.float())
    with NVMeStore(tmp_path, buffer_bytes=4 * PADDED) as store, LayerStreamer(model[1:], store):
        keys = store.keys()  # one flat per dtype in the mixed layer, one in the others
        assert sorted(k for k in keys if k.startswith("layer.1.")) == ["layer.1.bfloat16", "layer.1.float32"]
        assert len(keys) == DEPTH + 1
        with torch.no_grad():
            assert torch.equal(model(tokens(0)), reference(tokens(0)))


@pytest.mark.parametrize("kind", ["host", "nvme"])
def test_only_the_running_layer_has_weights_while_the_model_runs(tmp_path: Path, kind: str):
    model = make_model()
    seen: list[tuple[int, int, list[int]]] = []

    def probe(i: int):
        def hook(*_) -> None:  # inside layer i: walk every parameter of the model as it is now
            live = [j for j, block in enumerate(model[1:]) if nbytes(block.parameters())]
            seen.append((i, nbytes(model.parameters()), live))
        return hook

    for i, block in enumerate(model[1:]):
        block.fc1.register_forward_hook(probe(i))
    store = make_store(kind, tmp_path)
    with LayerStreamer(model[1:], store, prefetch=1) as streamer, torch.no_grad():
        assert nbytes(model.parameters()) == EMBED  # construction moved every block's weights out
        for step in range(2):
            model(tokens(step))
        assert [i for i, _, _ in seen] == list(range(DEPTH)) * 2
        for i, total, live in seen:
            # the running layer only: the one read ahead waits in the store, not in the model
            assert live == [i] and total == EMBED + LAYER <= EMBED + 2 * LAYER
        assert nbytes(model.parameters()) == EMBED and streamer.live_layers() == []
    if kind == "nvme":
        store.close()


def live_tensor_bytes(exclude: set[int]) -> int:
    """Bytes of every storage that a live tensor holds, each storage counted once."""
    storages: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in exclude:
                    storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_with_nvme_the_streamed_weights_are_not_all_in_memory(tmp_path: Path):
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]  # kept alive: no address reuse
    exclude = {t.untyped_storage().data_ptr() for t in before if t.device.type == "cpu"}
    model = make_model()
    measured: list[int] = []
    for block in model[1:]:
        block.fc1.register_forward_hook(lambda *_: measured.append(live_tensor_bytes(exclude)))
    budget = 2 * PADDED  # the running layer + one read ahead
    with NVMeStore(tmp_path, buffer_bytes=budget) as store, LayerStreamer(model[1:], store), torch.no_grad():
        for step in range(3):
            model(tokens(step))
    activations = 4 * 2 * 8 * H * 4  # a few (batch, seq, hidden) fp32 tensors
    # staging: the store's buffers, at most buffer_bytes, each with up to one page of alignment slack
    bound = EMBED + budget + 2 * ALIGN + activations
    assert len(measured) == 3 * DEPTH
    assert max(measured) <= bound < DEPTH * LAYER
    print(f"\nlive CPU tensor bytes inside each layer: max {max(measured) / 2**20:.2f} MiB (bound "
          f"{bound / 2**20:.2f} MiB; streamed weights {DEPTH * LAYER / 2**20:.2f} MiB; one layer "
          f"{LAYER / 2**20:.2f} MiB)")
    del before


def test_a_forward_in_grad_mode_is_right_and_warns_once_that_backward_is_not_possible(tmp_path: Path):
    reference, model = make_model(), make_model()
    with NVMeStore(tmp_path, buffer_bytes=2 * PADDED) as store, LayerStreamer(model[1:], store):
        with pytest.warns(UserWarning, match="backward through streamed layers is not possible") as caught:
            out = model(tokens(0))
        assert len(caught) == 1
        assert torch.equal(out, reference(tokens(0)))
        with pytest.raises(RuntimeError):  # autograd saved the parameters, which are empty again
            out.sum().backward()


@pytest.mark.parametrize("kind", ["host", "nvme"])
def test_restore_gives_back_the_exact_weights_and_the_model_runs_without_the_store(tmp_path: Path, kind: str):
    model = make_model()
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    store = make_store(kind, tmp_path)
    streamer = LayerStreamer(model[1:], store, prefetch=1)
    with torch.no_grad():
        streamed = [model(tokens(step)) for step in range(3)]
    streamer.restore()
    streamer.close()  # after restore: nothing left to free, the weights stay
    assert store.keys() == []
    if kind == "nvme":
        store.close()
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name]), name
    with torch.no_grad():
        assert all(torch.equal(model(tokens(step)), out) for step, out in enumerate(streamed))
    assert streamer.live_layers() == []


def test_a_layer_without_parameters_or_a_parameter_in_two_layers_is_refused_by_name():
    model = make_model()
    with pytest.raises(ValueError, match=r"layer 2 \(GELU\) has no parameters"):
        LayerStreamer([model[1], model[2], nn.GELU()], HostStore())
    model[3].fc1.weight = model[1].fc1.weight
    with pytest.raises(ValueError, match=r"layers\[2\]\.fc1\.weight is also layers\[0\]\.fc1\.weight"):
        LayerStreamer(model[1:], HostStore())
    with pytest.raises(ValueError, match="prefetch"):
        LayerStreamer(model[1:2], HostStore(), prefetch=-1)
    assert nbytes(model.parameters()) == EMBED + DEPTH * LAYER - D * H * 4  # nothing was moved
    with pytest.raises(ValueError, match=r"parameters are on \['cpu', 'meta'\]: pass device="):
        LayerStreamer([model[1], model[2].to("meta")], HostStore())


def test_running_after_close_is_a_clear_error_and_close_frees_the_store(tmp_path: Path):
    model = make_model()
    with NVMeStore(tmp_path, buffer_bytes=2 * PADDED) as store:
        with LayerStreamer(model[1:], store) as streamer:
            assert len(store.keys()) == DEPTH
        assert store.keys() == [] and not list(store.directory.glob("*.swp"))
        with pytest.raises(RuntimeError, match="layer 0 ran, but this LayerStreamer was closed"):
            model(tokens(0))
        with pytest.raises(RuntimeError, match="was closed"):
            streamer.restore()
        streamer.close()  # twice is fine


def test_a_store_failure_while_moving_weights_out_leaves_the_model_whole():
    class FullStore(HostStore):
        def create(self, key: str, value: torch.Tensor) -> None:
            if len(self.keys()) == 3:
                raise OSError(28, "No space left on device")
            super().create(key, value)

    reference, model, store = make_model(), make_model(), FullStore()
    with pytest.raises(OSError, match="No space"):
        LayerStreamer(model[1:], store)
    assert store.keys() == []
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    with torch.no_grad():
        assert torch.equal(model(tokens(0)), reference(tokens(0)))


def test_a_buffer_budget_below_one_layer_is_refused_before_any_weight_moves(tmp_path: Path):
    reference, model = make_model(), make_model()
    with NVMeStore(tmp_path, buffer_bytes=PADDED // 2) as store:
        with pytest.raises(MemoryError, match=r"cannot hold 'layer\.0\.float32'"):
            LayerStreamer(model[1:], store)
        assert store.keys() == [] and not list(store.directory.glob("*.swp"))
    with torch.no_grad():
        assert torch.equal(model(tokens(0)), reference(tokens(0)))


def test_a_read_failure_is_the_stores_own_error_naming_the_file(tmp_path: Path):
    model = make_model()
    with NVMeStore(tmp_path, buffer_bytes=2 * PADDED) as store, LayerStreamer(model[1:], store):
        store.drop_cache()
        for swap_file in store.directory.glob("*.swp"):
            os.truncate(swap_file, 0)
        with pytest.raises(SwapIOError, match=r"swap file .*layer\.0\.float32\.swp ended at byte 0"), torch.no_grad():
            model(tokens(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["host", "nvme"])
def test_on_cuda_outputs_equal_and_device_memory_holds_about_two_layers(tmp_path: Path, kind: str):
    reference, model = make_model().cuda(), make_model().cuda()
    peaks: list[int] = []
    for block in model[1:]:
        block.fc1.register_forward_hook(lambda *_: peaks.append(torch.cuda.memory_allocated()))
    store = make_store(kind, tmp_path, layers=3)
    with LayerStreamer(model[1:], store, prefetch=1), torch.no_grad():
        base = torch.cuda.memory_allocated()  # the embedding, the reference model
        for step in range(3):
            assert torch.equal(model(tokens(step).cuda()), reference(tokens(step).cuda()))
    # the running layer, the one copied ahead, and the last one's memory until its kernels end
    assert max(peaks) - base <= 3 * LAYER + 4 * 2 * 8 * H * 4
    if kind == "nvme":
        store.close()
