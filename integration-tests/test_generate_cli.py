"""``zero generate`` on the project's GPT: the tokens it prints are the engine's (whole and over 2
tensor-parallel ranks, relaunched through zero run), a tokenizer object encodes and decodes text, and
mistakes are one line with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zero_all

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, GPTConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

ARGS = {"vocab_size": 96, "block_size": 48, "n_layer": 2, "n_head": 4, "n_embd": 32}
MODEL = ["--model", "gpt:GPT", *(x for k, v in ARGS.items() for x in ("--model-arg", f"{k}={v}"))]


def zero(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zero_all", "generate", *args], cwd=EXAMPLES, capture_output=True,
                          text=True, timeout=240, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    torch.manual_seed(7)
    model = GPT(GPTConfig(**ARGS))
    path = tmp_path_factory.mktemp("w") / "gpt.pt"
    torch.save(model.state_dict(), path)
    engine = zero_all.init_inference(model, dtype="fp32")
    return path, engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=12)


@pytest.mark.parametrize("tp", [1, 2])
def test_prints_the_engines_tokens(weights: tuple[Path, torch.Tensor], tp: int):
    path, want = weights
    done = zero(*MODEL, "--checkpoint", str(path), "--prompt-ids", "5,6,7", "--max-new-tokens", "12",
                "--tp", str(tp))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == want[0].tolist()
    assert "zero generate: 12 tokens in" in done.stderr and f"tp {tp}" in done.stderr


def test_text_through_a_tokenizer_object(weights: tuple[Path, torch.Tensor]):
    path, _ = weights
    done = zero(*MODEL, "--checkpoint", str(path), "--tokenizer", "gpt:CharCorpus", "--prompt", "def f(x):",
                "--max-new-tokens", "8", "--dtype", "int8")
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout.rstrip("\n")
    assert text.startswith("def f(x):") and len(text) == len("def f(x):") + 8


@pytest.mark.parametrize(("args", "says"), [
    (["--model", "nosuch:Model", "--prompt-ids", "1"], "--model nosuch:Model: no module named 'nosuch'"),
    ([*MODEL, "--prompt", "hi"], "--prompt needs a tokenizer"),
    (["--model", "/no/such/dir", "--prompt-ids", "1"], "--model /no/such/dir does not exist"),
    ([*MODEL, "--prompt-ids", "1", "--max-new-tokens", "0"], "'0' must be >= 1"),
    ([*MODEL, "--prompt-ids", "1", "--checkpoint", "/no/such.pt"], "checkpoint: /no/such.pt does not exist"),
    ([*MODEL, "--prompt-ids", "500,1"], "token ids must be in [0, 96) for this model's vocabulary"),
    ([*MODEL, "--prompt-ids", "1,2", "--max-new-tokens", "100"], "2 prompt + 100 new tokens exceed the model's 48 "
                                                                 "positions (GPT.cfg.block_size)"),
    ([*MODEL, "--prompt-ids", "1", "--offload", "nvme"], "--offload nvme needs --nvme-path"),
    ([*MODEL, "--prompt-ids", "1", "--do-sample", "--temperature", "0"], "temperature must be > 0 when sampling"),
])
def test_mistakes_are_one_line_exit_2(args: list[str], says: str):
    done = zero(*args)
    assert done.returncode == 2 and says in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr, done.stderr
