"""DeepSpeed's ``deepspeed.inference``: the inference engine and its config (re-exported)."""

from ._inference import InferenceConfig as DeepSpeedInferenceConfig
from ._inference import InferenceEngine, init_inference

__all__ = ["DeepSpeedInferenceConfig", "InferenceEngine", "init_inference"]
