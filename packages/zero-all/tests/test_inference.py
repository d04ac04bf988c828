"""init_inference with DeepSpeed's arguments: the config read strictly (aliases, dtypes, one-line errors
naming the key), tp_size checked against the job, and generate on a model that decodes without a cache
equal to the argmax loop; the engine is the model (forward, module)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

import zero_all
from zero_all import ConfigError, init_inference
from zero_all.inference import DeepSpeedInferenceConfig, InferenceEngine
from zero_comm.testing import run_ranks


class TinyLM(nn.Module):
    """A causal LM returning logits (batch, positions, vocabulary) with no cache of its own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 32)
        self.rnn = nn.GRU(32, 32, batch_first=True)
        self.head = nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(ids))[0])


def test_the_engine_is_the_model_and_generates_as_the_argmax_loop():
    engine = init_inference(TinyLM(), dtype=torch.float32)
    assert isinstance(engine, InferenceEngine) and isinstance(engine.module, TinyLM)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    want = ids
    with torch.no_grad():
        for _ in range(10):
            want = torch.cat([want, engine.module(want)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(engine.generate(ids, max_new_tokens=10), want)
    assert torch.equal(engine(ids), engine.module(ids))
    eos = int(want[0, 6])
    assert torch.equal(engine.generate(ids, max_new_tokens=4, eos_token_id=eos), want[:, :7])  # stops at eos
    other = torch.tensor([[9, 2, 6, 5, 3]])
    with torch.no_grad():
        other_want = other
        for _ in range(4):
            other_want = torch.cat([other_want, engine.module(other_want)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert eos not in other_want[0, 5:].tolist()
    both = engine.generate(torch.cat([ids, other]), max_new_tokens=4, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(both[0], torch.cat([want[0, :7], torch.zeros(2, dtype=want.dtype)]))  # padded after eos
    assert torch.equal(both[1], other_want[0])


def test_deepspeeds_forms_of_the_config_are_read():
    for kwargs in ({"dtype": torch.float32}, {"dtype": "fp32"}, {"dtype": "torch.float32"},
                   {"config": {"dtype": "float32", "tensor_parallel": {"tp_size": 1}}},
                   {"mp_size": 1, "dtype": torch.float32, "kernel_inject": True, "max_tokens": 64}):
        engine = init_inference(TinyLM(), **kwargs)
        assert engine.config.torch_dtype == torch.float32 and engine.config.tp_size == 1
    engine = init_inference(TinyLM(), replace_with_kernel_inject=True, max_out_tokens=64, dtype="fp32")
    assert engine.config.replace_with_kernel_inject and engine.config.max_out_tokens == 64
    assert isinstance(engine.config, DeepSpeedInferenceConfig)
    assert init_inference(TinyLM()).config.torch_dtype == torch.float16  # DeepSpeed's default
    assert next(init_inference(TinyLM(), dtype=torch.bfloat16).module.parameters()).dtype == torch.bfloat16


def test_a_json_file_config(tmp_path):
    path = tmp_path / "inference.json"
    path.write_text(json.dumps({"dtype": "fp32", "replace_with_kernel_inject": True, "max_out_tokens": 32}))
    engine = init_inference(TinyLM(), config=str(path))
    assert engine.config.max_out_tokens == 32
    with pytest.raises(ValueError, match="exceed max_out_tokens 32"):
        engine.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tensor_paralel": {"tp_size": 2}}, "tensor_paralel: unknown key; did you mean 'tensor_parallel'?"),
    ({"tensor_parallel": {"tp_size": 0}}, "tensor_parallel.tp_size: must be >= 1, got 0"),
    ({"tensor_parallel": {"tp_size": 2}}, "tensor_parallel.tp_size: 2 needs 2 ranks; this job has 1 (launch it "
                                          "with zero run --nproc 2)"),
    ({"tensor_parallel": {"tp_sise": 2}}, "tensor_parallel.tp_sise: unknown key in tensor_parallel; did you mean "
                                          "'tp_size'?"),
    ({"dtype": "fp8"}, "dtype: expected one of fp16, bf16, fp32, int8 (or a torch dtype), got 'fp8'"),
    ({"dtype": torch.float64}, "dtype: zero's inference runs float16, bfloat16, float32 or int8, not torch.float64"),
    ({"max_out_tokens": "many"}, 'max_out_tokens: expected an integer, got "many"'),
    ({"moe": True}, "moe: zero's inference does not have MoE inference; leave it at its default"),
    ({"kernel_inject": True, "replace_with_kernel_inject": True}, "kernel_inject: is DeepSpeed's other name for "
                                                                  "replace_with_kernel_inject; give one of them"),
    ({"zero": {"stage": 3, "offload_param": {"device": "nvme"}}}, "zero.offload_param.nvme_path: device 'nvme' "
                                                                  "needs an nvme_path"),
])
def test_bad_arguments_are_one_line_errors_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError) as info:
        init_inference(TinyLM(), **kwargs)
    assert str(info.value) == message and "\n" not in str(info.value)


def test_a_key_given_twice_must_agree():
    with pytest.raises(ConfigError, match="max_out_tokens: given as 8 and in the config as 16; give it once"):
        init_inference(TinyLM(), config={"max_out_tokens": 16}, max_out_tokens=8)


def test_cuda_graphs_are_accepted_and_ignored_on_cpu_with_one_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="zero_all.inference"):
        init_inference(TinyLM(), dtype="fp32", enable_cuda_graph=True)
    lines = [r.getMessage() for r in caplog.records if "cuda_graph" in r.getMessage()]
    assert len(lines) == 1 and "enable_cuda_graph ignored on CPU" in lines[0]


def too_many(tp: int) -> str:
    try:
        init_inference(TinyLM(), tensor_parallel={"tp_size": tp}, dtype="fp32")
    except ConfigError as exc:
        return str(exc)
    return "no error"


def test_tp_size_beyond_the_world_or_not_dividing_it_is_refused_on_every_rank():
    assert run_ranks(too_many, 2, 4) == ["tensor_parallel.tp_size: 4 needs 4 ranks; this job has 2 (launch it "
                                         "with zero run --nproc 4)"] * 2
    assert run_ranks(too_many, 4, 3) == ["tensor_parallel.tp_size: 3 does not divide the job's 4 ranks"] * 4


def different_weights() -> str:
    import torch.distributed as dist

    zero_all.init_distributed()
    model = TinyLM()
    if dist.get_rank() == 1:
        with torch.no_grad():
            model.head.bias.add_(1.0)
    try:
        init_inference(model, tensor_parallel={"tp_size": 2}, dtype="fp32")
    except ConfigError as exc:
        return str(exc)
    return "no error"


def test_ranks_that_hold_different_weights_are_refused():
    for message in run_ranks(different_weights, 2):
        assert message.startswith("tensor_parallel: the ranks hold different weights"), message


def test_options_zeros_loop_cannot_honour_are_refused_not_dropped():
    engine = init_inference(TinyLM(), dtype="fp32")
    ids = torch.tensor([[3, 1, 4], [0, 2, 7]])
    with pytest.raises(ValueError, match="num_beams needs a Hugging Face model's own generate"):
        engine.generate(ids, num_beams=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="attention_mask with padding needs a Hugging Face model's own generate"):
        engine.generate(ids, attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]), max_new_tokens=3)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['min_new_tokens'\]"):
        engine.generate(ids, min_new_tokens=2)
    for bad, says in [({"do_sample": True, "temperature": 0.0}, "temperature must be > 0 when sampling, got 0.0"),
                      ({"top_p": 1.5}, r"top_p must be in \[0, 1\], got 1.5"), ({"top_k": -3}, "top_k must be >= 0"),
                      ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
                      ({"max_length": 2}, "max_length 2 leaves no room after the 3-token prompt")]:
        with pytest.raises(ValueError, match=says):
            engine.generate(ids, **bad)
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.generate(torch.zeros(1, 0, dtype=torch.long))
    assert engine.generate(ids).shape == (2, 23)  # Hugging Face's default: 20 new tokens


def test_int8_with_streamed_layers_is_refused_before_the_model_changes():
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"zero\.offload_param: zero streams float weights"):
        init_inference(model, dtype=torch.int8, zero={"stage": 3, "offload_param": {"device": "cpu"}})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_one_dtype_spelled_two_ways_is_not_a_conflict():
    engine = init_inference(TinyLM(), config={"dtype": "fp32"}, dtype=torch.float32)
    assert engine.config.torch_dtype == torch.float32


def test_a_checkpoint_description_json_names_the_weights(tmp_path):
    torch.manual_seed(3)
    trained = TinyLM()
    with torch.no_grad():
        trained.head.bias.add_(0.5)
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "ckpt.json").write_text(json.dumps({"type": "ds_model", "checkpoints": ["weights.pt"],
                                                    "version": 1.0}))
    for checkpoint in (str(tmp_path / "ckpt.json"), {"checkpoints": ["weights.pt"]}):
        engine = init_inference(TinyLM(), dtype="fp32", checkpoint=checkpoint, base_dir=str(tmp_path)
                                if isinstance(checkpoint, dict) else "")
        assert torch.equal(engine.module.head.bias, trained.head.bias)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"bad\.json is not a JSON checkpoint description"):
        init_inference(TinyLM(), dtype="fp32", checkpoint=str(tmp_path / "bad.json"))
