"""The ``ds_config.json`` schema (:mod:`._schema`: msgspec Structs, strict, every error naming the key),
``"auto"`` outside Hugging Face's Trainer (:mod:`._auto`) and the generated reference page (:mod:`._doc`)."""

from ._auto import TRAINER_DEFAULTS, fill_optimizer_auto, fill_scheduler_auto
from ._schema import ActivationCheckpointingConfig, ConfigError, DeepSpeedConfig, OffloadConfig, load_config

__all__ = ["TRAINER_DEFAULTS", "ActivationCheckpointingConfig", "ConfigError", "DeepSpeedConfig", "OffloadConfig",
           "fill_optimizer_auto", "fill_scheduler_auto", "load_config"]
