"""LayerStreamer: ZeRO-Inference's weight streaming -- layers keep their weights in a store and
have them on the device only while they run.

Each layer's parameters are laid end to end, one flat tensor per dtype, under the store key
``"{key_prefix}.{index}.{dtype}"`` (one large I/O per layer, not one per parameter); the
parameters hold empty tensors. A forward pre-hook materialises the layer's weights and starts
reading the next ``prefetch`` layers (after the last, the first: the next token runs the
stack again); a forward post-hook empties them again.

On the CPU the weights are views of the store's tensors, borrowed for exactly the layer's
forward, so an NVMeStore never recycles a buffer under a running layer. On CUDA the next
layers are copied on a side stream from page-locked memory (the store's buffer when pinned,
else a pinned copy from torch's caching host allocator) once the running layer's kernels are
queued, after the CPU has waited for the layer before it to finish: device memory holds the
running layer, those copied ahead, and the previous one's until its kernels end.

Inference only: autograd saves the parameters themselves, emptied after each layer, so a
backward through streamed layers fails (a forward in grad mode warns once). Buffers (a
norm's running statistics) stay in the layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ._swapper import padded

__all__ = ["LayerStreamer"]


class TensorStore(Protocol):
    def create(self, key: str, value: torch.Tensor) -> None: ...
    def get(self, key: str) -> torch.Tensor: ...
    def release(self, key: str) -> None: ...


@dataclass
class _Flat:
    """One store key: a layer's parameters of one dtype, end to end."""

    key: str
    dtype: torch.dtype
    numel: int
    params: list[tuple[nn.Parameter, int, torch.Size]]  # parameter, offset, shape


class LayerStreamer:
    """Keep ``layers``' weights in ``store``; bring each layer's onto ``device`` only while it runs.

    Args:
        layers: the modules run in this order (e.g. a transformer's blocks). A parameter
            may belong to one layer only; modules outside ``layers`` (embeddings, head)
            stay where they are.
        store: a :class:`HostStore` or :class:`NVMeStore` (or anything with
            ``create``/``get``/``release``, optionally ``get_async``/``delete``). An
            NVMeStore's ``buffer_bytes`` must hold ``1 + prefetch`` of the largest layer's
            flats (each padded to 4 KiB); less reads ahead less.
        device: where the weights live while their layer runs (default: where the
            parameters are now; they must all be on one device).
        prefetch: layers read ahead. More hides more I/O latency behind compute and
            holds that many more layers in device memory (and store buffers); ``0``
            reads each layer only when it is needed.
        key_prefix: the store keys' prefix; streamers sharing one store need different ones.
    """

    def __init__(self, layers: Sequence[nn.Module], store: TensorStore, *,
                 device: torch.device | str | None = None, prefetch: int = 1, key_prefix: str = "layer"):
        if not layers:
            raise ValueError("LayerStreamer needs at least one layer")
        if type(prefetch) is not int or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
        self.layers, self.store = list(layers), store
        self.prefetch = min(prefetch, len(self.layers) - 1)
        owner: dict[int, str] = {}
        devices: set[torch.device] = set()
        for i, layer in enumerate(self.layers):
            named = list(layer.named_parameters(recurse=True))
            if not named:
                raise ValueError(f"layer {i} ({type(layer).__name__}) has no parameters: nothing to stream")
            for name, p in named:
                if id(p) in owner:
                    raise ValueError(f"parameter layers[{i}].{name} is also {owner[id(p)]}: a parameter "
                                     "shared between layers cannot be streamed with either")
                owner[id(p)] = f"layers[{i}].{name}"
                devices.add(p.device)
        if device is None and len(devices) > 1:
            raise ValueError(f"the layers' parameters are on {sorted(map(str, devices))}: pass device=")
        self.device = torch.device(device) if device is not None else devices.pop()
        self._flats: list[list[_Flat]] = []
        self._empty: dict[torch.dtype, torch.Tensor] = {}  # the placeholder of each dtype, 0 elements
        self._live: dict[int, list[str]] = {}  # materialised layers -> store keys they borrow
        self._reads: dict[int, list[Any]] = {}  # layers whose store reads are under way -> handles
        self._staged: dict[int, tuple[list[torch.Tensor], Any]] = {}  # CUDA: copies issued -> flats, event
        self._copying: list[tuple[Any, list[str]]] = []  # CUDA: (event, keys borrowed until it completes)
        self._last_done: Any = None  # CUDA: event after the last layer that ran
        self._cuda = self.device.type == "cuda"
        self._side = torch.cuda.Stream(self.device) if self._cuda else None
        self._warned = False
        self._closed: str | None = None
        self._hooks: list[Any] = []
        try:
            for i, layer in enumerate(self.layers):
                self._flats.append(self._offload(i, layer, key_prefix))
        except BaseException:
            self._put_back(range(len(self._flats)))  # nothing lost: what went in comes back out
            raise
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: self._before(i)))
            self._hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: self._after(i), always_call=True))

    # -- public ----------------------------------------------------------------------------------
    @staticmethod
    def buffer_bytes(layers: Sequence[nn.Module], prefetch: int = 1) -> int:
        """The NVMeStore ``buffer_bytes`` that streams ``layers``: the running layer and ``prefetch`` read
        ahead, each layer as one flat per dtype, padded for O_DIRECT (a larger budget only keeps more layers
        in host memory)."""
        def layer_bytes(layer: nn.Module) -> int:
            by_dtype: dict[torch.dtype, int] = {}
            for p in layer.parameters(recurse=True):
                by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.numel() * p.element_size()
            return sum(padded(n) for n in by_dtype.values())

        return (1 + min(prefetch, len(layers) - 1)) * max(layer_bytes(layer) for layer in layers)

    def live_layers(self) -> list[int]:
        """Indices of the layers whose weights are materialised now (for debugging)."""
        return sorted(self._live)

    def restore(self) -> None:
        """Put every layer's weights back on ``device`` for good, remove the hooks, free the store keys."""
        self._check_open()
        self._settle()
        self._remove_hooks()
        self._put_back(range(len(self.layers)))
        self._closed = "restored the weights into the layers and stopped streaming"

    def close(self) -> None:
        """Remove the hooks and free the store keys. The layers keep empty weights: running them
        afterwards raises (``restore()`` instead to keep the model usable)."""
        if self._closed:
            return
        self._settle()
        self._remove_hooks()
        for flats in self._flats:
            for flat in flats:
                self._delete(flat.key)
        self._closed = "was closed and the layers' weights freed (restore() instead of close() keeps them)"
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: self._check_open(i)))

    def __enter__(self) -> LayerStreamer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hooks -----------------------------------------------------------------------------------
    def _before(self, i: int) -> None:
        self._check_open(i)
        if torch.is_grad_enabled() and not self._warned:
            self._warned = True
            warnings.warn("LayerStreamer: a forward with grad enabled; backward through streamed layers is not "
                          "possible (autograd saves the parameters, emptied after each layer). Run under "
                          "torch.inference_mode() or torch.no_grad().", stacklevel=3)
        if i not in self._live:
            if self._cuda:
                if i not in self._staged:
                    self._stage(i)
                flats, event = self._staged.pop(i)
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)
                for t in flats:
                    t.record_stream(stream)  # freed after this layer's kernels, not before
                borrowed: list[str] = []
            else:  # on the CPU: views of the store's tensors, borrowed until the layer's forward ends
                flats, borrowed = self._borrow(i), [f.key for f in self._flats[i]]
                if self.device.type != "cpu":  # another accelerator: a plain copy
                    flats, borrowed = [t.to(self.device) for t in flats], self._release(borrowed)
            self._assign(i, flats)
            self._live[i] = borrowed
        get_async = getattr(self.store, "get_async", None)
        for j in self._upcoming(i):
            if get_async is not None and j not in self._reads and j not in self._staged and j not in self._live:
                self._reads[j] = [get_async(f.key) for f in self._flats[j]]

    def _after(self, i: int) -> None:
        self._drop(i)
        if self._cuda:
            done, self._last_done = self._last_done, torch.cuda.Event()
            self._last_done.record(torch.cuda.current_stream(self.device))
            if done is not None:
                done.synchronize()  # layer i - 1 finished: its memory is free for the next copies
            self._wait_copies()
            for j in self._upcoming(i):
                if j not in self._staged and j not in self._live:
                    self._stage(j)

    # -- internals -------------------------------------------------------------------------------
    def _offload(self, i: int, layer: nn.Module, prefix: str) -> list[_Flat]:
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in layer.parameters(recurse=True):
            by_dtype.setdefault(p.dtype, []).append(p)
        flats: list[_Flat] = []
        for dtype, params in by_dtype.items():
            placed, offset = [], 0
            for p in params:
                placed.append((p, offset, p.shape))
                offset += p.numel()
            flat = _Flat(f"{prefix}.{i}.{str(dtype).removeprefix('torch.')}", dtype, offset, placed)
            try:
                self.store.create(flat.key, torch.cat([p.detach().reshape(-1) for p in params]))
            except BaseException:
                for done in flats:
                    self._delete(done.key)
                raise
            flats.append(flat)
        for flat in flats:  # only once the store holds all of them
            for p, _, _ in flat.params:
                p.data = self._empty_like(flat.dtype)
        return flats

    def _put_back(self, indices: range) -> None:
        for i in indices:
            flats: list[torch.Tensor] = []
            for flat in self._flats[i]:
                out = torch.empty(flat.numel, dtype=flat.dtype, device=self.device)
                out.copy_(self.store.get(flat.key).reshape(-1))  # a copy: never store memory
                self.store.release(flat.key)
                self._delete(flat.key)
                flats.append(out)
            self._assign(i, flats)

    def _borrow(self, i: int) -> list[torch.Tensor]:
        """Layer ``i``'s flats in host memory, borrowed from the store (reads already under way first)."""
        pending = self._reads.pop(i, None)
        if pending is not None:
            return [h.wait() for h in pending]
        return [self.store.get(f.key) for f in self._flats[i]]

    def _stage(self, j: int) -> None:
        """Start copying layer ``j`` to the device on the side stream (CUDA)."""
        host, keys = self._borrow(j), [f.key for f in self._flats[j]]
        if not all(t.is_pinned() for t in host):
            host = [t.pin_memory() for t in host]  # a copy from torch's caching host allocator
            keys = self._release(keys)  # staged in pinned memory: the store's buffers are free again
        assert self._side is not None
        with torch.cuda.stream(self._side):
            flats = [torch.empty(f.numel, dtype=f.dtype, device=self.device) for f in self._flats[j]]
            for dst, src in zip(flats, host):
                dst.copy_(src.reshape(-1), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._side)
        self._copying.append((event, keys))
        self._staged[j] = (flats, event)

    def _wait_copies(self) -> None:
        """Wait for the copies issued (a layer ago: done by now) and give their store buffers back (CUDA)."""
        for event, keys in self._copying:
            event.synchronize()
            self._release(keys)
        self._copying.clear()

    def _settle(self) -> None:
        """Finish every copy and give back every borrow; forget reads ahead not yet taken."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self._wait_copies()
        for i in list(self._live):
            self._drop(i)
        self._staged.clear()
        self._reads.clear()  # handles not waited on borrow nothing

    def _drop(self, i: int) -> None:
        for flat in self._flats[i]:
            for p, _, _ in flat.params:
                p.data = self._empty_like(flat.dtype)
        self._release(self._live.pop(i, []))

    def _assign(self, i: int, flats: list[torch.Tensor]) -> None:
        for flat, t in zip(self._flats[i], flats):
            for p, offset, shape in flat.params:
                p.data = t[offset:offset + shape.numel()].view(shape)

    def _release(self, keys: list[str]) -> list[str]:
        """Give back ``keys``' borrows; returns the (now empty) list of keys still borrowed."""
        for key in keys:
            self.store.release(key)
        return []

    def _delete(self, key: str) -> None:
        delete = getattr(self.store, "delete", None)
        if delete is not None:
            delete(key)

    def _empty_like(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._empty:
            with torch.inference_mode(False):
                self._empty[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return self._empty[dtype]

    def _upcoming(self, i: int) -> list[int]:
        return [(i + k) % len(self.layers) for k in range(1, self.prefetch + 1)]

    def _remove_hooks(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()

    def _check_open(self, i: int | None = None) -> None:
        if self._closed:
            what = "" if i is None else f"layer {i} ran, but "
            raise RuntimeError(f"{what}this LayerStreamer {self._closed}")
