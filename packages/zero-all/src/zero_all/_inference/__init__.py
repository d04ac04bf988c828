"""The inference engine: ``init_inference`` and :class:`InferenceEngine` (tensor parallelism, a KV cache,
int8 weights, ZeRO-Inference weight streaming), wired from zero-pipe, zero-kernels and zero-offload."""

from ._config import InferenceConfig, load_inference_config
from ._engine import InferenceEngine, init_inference

__all__ = ["InferenceConfig", "InferenceEngine", "init_inference", "load_inference_config"]
