"""Run an Accelerate script on CPU ranks: ``torchrun ... cpu_state.py SCRIPT ARGS...``.

On a machine without an accelerator, Accelerate finds no distributed backend unless its process state
is created with ``cpu=True``; it then counts one process per rank (each would train alone). Hugging
Face's ``TrainingArguments(use_cpu=True)`` creates that state before the Trainer's ``Accelerator``;
this does the same for a plain Accelerate script, then runs it unchanged. On GPUs it is not needed.
"""

from __future__ import annotations

import runpy
import sys

from accelerate import PartialState

if __name__ == "__main__":
    PartialState(cpu=True)  # gloo over the launched ranks; the script's Accelerator then takes its plugin
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
