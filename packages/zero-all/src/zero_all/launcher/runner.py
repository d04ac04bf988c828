"""``deepspeed.launcher.runner``: the name of DeepSpeed's per-job environment file.

Accelerate's DeepSpeed launcher imports ``DEEPSPEED_ENVIRONMENT_NAME`` before it launches. On one node it then
starts the ranks with torchrun, which needs nothing more from zero. Across nodes (unless its ``standard``
multi-node launcher is chosen, which is torchrun again) it writes the variables it wants every node to see
into this file and runs the ``deepspeed`` command, which zero does not install: launch those jobs with
``zero run`` (DeepSpeed's hostfile and flags) or Accelerate's ``--deepspeed_multinode_launcher standard``.
"""

DEEPSPEED_ENVIRONMENT_NAME = ".deepspeed_env"

__all__ = ["DEEPSPEED_ENVIRONMENT_NAME"]
