"""``from_pretrained`` under Hugging Face's ZeRO-3 path, measured: ``torchrun zero3_load.py TRAINED_DIR OUT.json``.

``TrainingArguments(deepspeed=<a stage-3 config>)`` before the model is built makes Transformers build it
inside ``deepspeed.zero.Init`` (zero's: each parameter partitioned as its module is built) and load each
checkpoint weight into its shards one module at a time through ``GatheredParameters``. After every gather this
walks the live tensors (every ``nn.Parameter``'s storage, each counted once, plus every unit's flat shard) and
keeps the peak: the most parameter bytes a rank held at once. Rank 0 writes the peak, the shard bytes, the
largest gather unit and whether every loaded weight equals the checkpoint's.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, TrainingArguments

import zero_all
import zero_optim

CONFIG = Path(__file__).parent / "configs" / "zero3.json"


def live_parameter_bytes() -> int:
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Parameter):
            storage = obj.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, zero_optim.GatherUnit):
            total += obj.shard.untyped_storage().nbytes()
    return total


def main() -> None:
    trained, out = Path(sys.argv[1]), Path(sys.argv[2])
    training = TrainingArguments(output_dir=tempfile.mkdtemp(), deepspeed=str(CONFIG), use_cpu=True, report_to=[])
    assert training.hf_deepspeed_config.is_zero3()  # held: Transformers looks it up through a weak reference
    peak = [0]
    gather = zero_optim.GatherUnit.gather

    def measured(unit: zero_optim.GatherUnit, *args: object, **kwargs: object) -> None:
        gather(unit, *args, **kwargs)
        peak[0] = max(peak[0], live_parameter_bytes())

    zero_optim.GatherUnit.gather = measured  # type: ignore[method-assign]
    model = GPT2LMHeadModel.from_pretrained(trained)
    zero_optim.GatherUnit.gather = gather  # type: ignore[method-assign]
    units = {id(p.zero.unit): p.zero.unit for p in model.parameters() if isinstance(p, zero_optim.PartitionedParameter)}
    assert units, "from_pretrained did not build the model partitioned"
    shard_bytes = sum(u.shard.untyped_storage().nbytes() for u in units.values())
    largest = max(u.padded * u.shard.element_size() for u in units.values())
    saved = load_file(str(trained / "model.safetensors"))
    named = dict(model.named_parameters())
    equal = True
    with zero_all.zero.GatheredParameters(list(named.values())):
        for name, value in saved.items():
            if name in named:
                equal &= torch.equal(named[name].detach(), value)
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps({"peak_bytes": peak[0], "shard_bytes": shard_bytes, "largest_unit_bytes": largest,
                                   "equal": bool(equal), "units": len(units)}))


if __name__ == "__main__":
    main()
