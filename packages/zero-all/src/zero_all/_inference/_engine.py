"""``init_inference``: DeepSpeed's inference entry point, wired from zero's parts.

:class:`InferenceEngine` prepares a model in order -- load a checkpoint, cast to the
serving dtype, split attention heads and MLP columns over the tensor-parallel group
(zero-pipe's rewrite), quantise weights to int8 (zero-kernels), stream the layer stack
from host memory or NVMe (zero-offload), move to the device -- and then behaves as the
model did: ``engine(...)`` is its forward, ``engine.module`` the model itself, and
``engine.generate(...)`` decodes with a key/value cache (:mod:`._generate`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import zero_comm
import zero_kernels
import zero_offload
import zero_pipe

from .._config import ConfigError
from ._config import InferenceConfig, load_inference_config
from ._generate import Sampling, decode
from ._models import check_tp_divides, find_layers, is_hf, load_weights
from ._options import needs_hf_generate, resolve_options

__all__ = ["InferenceEngine", "init_inference"]

logger = logging.getLogger("zero_all.inference")


def init_inference(model: nn.Module, config: str | Path | Mapping[str, Any] | None = None,
                   **kwargs: Any) -> InferenceEngine:
    """Serve ``model`` as DeepSpeed's ``deepspeed.init_inference`` does: ``config`` is DeepSpeed's
    inference config (a dict or a JSON file) and keyword arguments are its keys (``dtype``,
    ``tensor_parallel={"tp_size": N}``, ``replace_with_kernel_inject``, ``checkpoint``,
    ``max_out_tokens``, ``quant``, ``zero``, ...). Every rank of the job calls it with the same model."""
    cfg, objects = load_inference_config(config, kwargs)
    return InferenceEngine(model, cfg, tp_group=objects.get("tp_group"))


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _tp_comm(tp_size: int, tp_group: Any) -> zero_comm.Communicator | None:
    if tp_group is not None:
        return zero_comm.ProcessGroupCommunicator(tp_group, name="tp")
    if tp_size == 1:
        return None
    world = zero_comm.init_distributed()
    if tp_size > world.world_size:
        raise ConfigError(f"tensor_parallel.tp_size: {tp_size} needs {tp_size} ranks; this job has "
                          f"{world.world_size} (launch it with zero run --nproc {tp_size})")
    if world.world_size % tp_size:
        raise ConfigError(f"tensor_parallel.tp_size: {tp_size} does not divide the job's {world.world_size} ranks")
    if tp_size == world.world_size:
        return world
    return zero_comm.build_mesh(zero_comm.ParallelDims(world.world_size, tp=tp_size)).tp


def _check_same_weights(model: nn.Module, tp: zero_comm.Communicator) -> None:
    """Every rank must start from the same weights: compare a checksum across the group."""
    total = torch.zeros(1, dtype=torch.float64)
    for p in model.parameters():
        total += p.detach().double().sum().cpu() + p.numel()
    extremes = torch.cat([total, -total])  # max of both: the largest and (negated) the smallest checksum
    tp.all_reduce(extremes, op="max")
    if extremes[0] != -extremes[1]:
        raise ConfigError("tensor_parallel: the ranks hold different weights (build or load the model the same "
                          "way on every rank: same seed, same checkpoint)")


class InferenceEngine(nn.Module):
    """A model prepared for serving; ``forward`` and ``generate`` are the model's, ``module`` the model."""

    def __init__(self, model: nn.Module, config: InferenceConfig, *, tp_group: Any = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"init_inference serves a torch.nn.Module, got {type(model).__name__}")
        self.module = model.eval()
        self._config = config
        self.tp = _tp_comm(config.tp_size, tp_group)
        self.device = _device()
        self.streamer: zero_offload.LayerStreamer | None = None
        self.quantized: zero_kernels.QuantizedWeights | None = None
        notes: list[str] = []
        if config.checkpoint is not None:
            notes.append(f"weights from {load_weights(model, config.checkpoint, config.base_dir)}")
        if config.torch_dtype != torch.int8:
            model.to(config.torch_dtype)
        if self.tp is not None and self.tp.world_size > 1:
            check_tp_divides(model, self.tp.world_size)
            _check_same_weights(model, self.tp)
            zero_pipe.tensor_parallelize(model, self.tp)
            notes.append(f"tensor parallel over {self.tp.world_size} ranks")
        if config.int8:
            block = config.quant.weight.group_size if config.quant is not None else 64
            self.quantized = zero_kernels.quantize_weights_(model, block_size=block)
            notes.append(f"int8 weights ({self.quantized.ratio:.2f}x the bytes)")
        offload = config.zero.offload_param
        if config.zero.stage == 3 and offload is not None and offload.device != "none":
            name, layers = find_layers(model)
            store: Any = (zero_offload.NVMeStore(Path(offload.nvme_path or "") / f"rank{self._rank()}",
                                                 buffer_bytes=zero_offload.LayerStreamer.buffer_bytes(list(layers)))
                          if offload.device == "nvme" else zero_offload.HostStore())
            self.streamer = zero_offload.LayerStreamer(list(layers), store, device=self.device)
            notes.append(f"{len(layers)} layers of {name} streamed from {offload.device}")
        model.to(self.device)
        if config.enable_cuda_graph:
            notes.append("enable_cuda_graph ignored" + (" on CPU" if self.device.type == "cpu" else
                                                        ": zero does not capture CUDA graphs"))
        if self._rank() == 0:
            logger.info("init_inference: %s, %s, %s", type(model).__name__,
                        str(config.torch_dtype).removeprefix("torch."), "; ".join(notes) or "as given")

    def _rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def config(self) -> InferenceConfig:
        return self._config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None = None, *, on_token: Callable[[int], None] | None = None,
                 **kwargs: Any) -> Any:
        """Decode after ``input_ids`` (batch, positions) as Hugging Face's ``generate`` does: greedy unless
        ``do_sample`` (``temperature``, ``top_k``, ``top_p``, ``generator``), ``max_new_tokens`` or
        ``max_length``, ``eos_token_id``/``pad_token_id``; a Hugging Face model's ``generation_config``
        supplies the defaults. What zero's loop does not do (beams, a padded ``attention_mask``, a
        repetition penalty, ...) goes to a Hugging Face model's own ``generate``. ``on_token(i)`` is
        called after each token of zero's loop."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", kwargs.pop("input_ids", None))
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
            raise ValueError("generate needs input_ids, a tensor of token ids of shape (batch, positions)")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        input_ids = input_ids.to(self.device)
        hf = is_hf(self.module)
        if needs_hf_generate(self.module, hf, kwargs):
            return self._hf_generate(input_ids, dict(kwargs))
        options = resolve_options(self.module, hf, kwargs, input_ids, self._config.max_out_tokens)
        sampling = Sampling(options.do_sample, options.temperature, options.top_k, options.top_p, options.generator)
        return decode(self.module, input_ids, max_new_tokens=options.new_tokens,
                      max_len=input_ids.shape[1] + options.new_tokens, sampling=sampling, eos=options.eos,
                      pad=options.pad, tp=self.tp, on_token=on_token)

    def _hf_generate(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        """The model's own ``generate``. Sampling draws from torch's global generator: it is seeded alike on
        every rank of the tensor-parallel group (from ``generator`` when given), so the ranks never diverge."""
        hf_generate: Callable[..., Any] = getattr(self.module, "generate")  # noqa: B009
        generator = kwargs.pop("generator", None)
        if not (kwargs.get("do_sample") or getattr(getattr(self.module, "generation_config", None), "do_sample",
                                                         False)):
            return hf_generate(input_ids, **kwargs)
        seed = torch.tensor([generator.initial_seed() if generator is not None
                             else int(torch.randint(0, 2**62, (1,)))], dtype=torch.int64)
        if self.tp is not None and self.tp.world_size > 1:
            self.tp.broadcast(seed, src=0)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            return hf_generate(input_ids, **kwargs)

    def destroy(self) -> None:
        """Put streamed weights back into the model (on the device) and free the store."""
        if self.streamer is not None:
            self.streamer.restore()
            self.streamer = None

