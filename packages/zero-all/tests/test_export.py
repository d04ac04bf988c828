"""Exporting a checkpoint gives the model's state_dict: after training at stages 1, 2 and 3 on two ranks,
``zero ckpt export`` and ``zero_to_fp32`` write what ``load_state_dict(strict=True)`` takes into a fresh
model -- trained weights, a frozen weight, BatchNorm statistics, a registered buffer, and a tied output
head under both its names -- and the fresh model's logits equal the trained engine's. safetensors files
round-trip; a checkpoint that predates the module record still exports what it holds, with a warning."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zero_all
import zero_ckpt
from zero_all._cli import main
from zero_all._engine._state import module_extras
from zero_all.utils.zero_to_fp32 import (
    convert_zero_checkpoint_to_fp32_state_dict,
    get_fp32_state_dict_from_zero_checkpoint,
    load_state_dict_from_zero_checkpoint,
)
from zero_comm.testing import run_ranks

VOCAB, WIDTH = 12, 8


class TiedNet(nn.Module):
    """An embedding tied to the output head, a BatchNorm, a frozen layer and a buffer the forward changes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.BatchNorm1d(WIDTH)
        self.frozen = nn.Linear(WIDTH, WIDTH)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += idx.shape[0]
        x = self.norm(torch.tanh(self.proj(self.embed(idx).mean(1))))
        return self.head(x + self.frozen(x))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (6, 5), generator=g)
    return idx, idx[:, 0]


def train_and_save(root: str, stage: int, old_style: bool = False) -> dict[str, torch.Tensor]:
    """Three steps at ``stage``, saved; the eval-mode logits of the trained module on a fixed batch.
    ``old_style``: saved as zero did before checkpoints recorded the module (masters, buffers and frozen
    weights, no record)."""
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": 6, "optimizer": {"type": "AdamW", "params": {"lr": 5e-2}},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = zero_all.initialize(model=TiedNet(), config=config)
    for step in range(3):
        idx, target = batch(100 * engine.comm.rank + step)
        engine.backward(F.cross_entropy(engine(idx), target))
        engine.step()
    if old_style:
        items = {"optimizer": engine.optimizer,
                 "module": zero_ckpt.tensors_state(module_extras(engine.module, engine.optimizer))}
        zero_ckpt.CheckpointManager(root, engine.comm).save("old", items, client_state={})
    else:
        engine.save_checkpoint(root)
    engine.module.eval()
    with torch.no_grad():
        return {"logits": engine(batch(7)[0]), "seen": engine.module.seen.clone()}


def fresh() -> TiedNet:
    torch.manual_seed(1234)  # other initial values than the trained model started from
    return TiedNet().eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(batch(7)[0])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_exported_state_dict_loads_strictly_and_gives_the_trained_logits(tmp_path: Path, stage: int,
                                                                         capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "ckpt"
    trained = run_ranks(train_and_save, 2, str(root), stage)[0]
    assert trained["seen"].item() == 18, "rank 0's buffer, which the forward counted up"

    state = get_fp32_state_dict_from_zero_checkpoint(root)
    assert list(state) == list(TiedNet().state_dict()), "every key, in the model's order, and no other"
    assert state["head.weight"] is state["embed.weight"], "the tied head is the embedding's tensor"
    assert state["norm.num_batches_tracked"].dtype == torch.int64 and state["norm.num_batches_tracked"].item() == 3
    model = fresh()
    model.load_state_dict(state, strict=True)
    assert model.head.weight is model.embed.weight
    assert torch.equal(logits(model), trained["logits"])

    assert main(["ckpt", "export", str(root), str(tmp_path / "model.pt")]) == 0
    assert "wrote" in capsys.readouterr().err
    from_cli = fresh()
    from_cli.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    assert torch.equal(logits(from_cli), trained["logits"])

    if stage == 2:  # the other ways out, once
        out = convert_zero_checkpoint_to_fp32_state_dict(root, tmp_path / "fp32.bin")
        via_convert = fresh()
        via_convert.load_state_dict(torch.load(out, weights_only=True), strict=True)
        assert torch.equal(logits(via_convert), trained["logits"])
        assert torch.equal(logits(load_state_dict_from_zero_checkpoint(fresh(), root, strict=True).eval()),
                           trained["logits"])

        no_frozen = get_fp32_state_dict_from_zero_checkpoint(root, exclude_frozen_parameters=True)
        assert set(state) - set(no_frozen) == {"frozen.weight", "frozen.bias"}


def test_safetensors_round_trip_keeps_both_names_of_a_tied_weight(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]):
    safetensors = pytest.importorskip("safetensors.torch")
    root = tmp_path / "ckpt"
    trained = run_ranks(train_and_save, 2, str(root), 3)[0]
    assert main(["ckpt", "export", str(root), str(tmp_path / "model.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().err
    loaded = safetensors.load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["head.weight"], loaded["embed.weight"]), "the tied weight, stored once per name"
    via_file = fresh()
    via_file.load_state_dict(loaded, strict=True)
    assert torch.equal(logits(via_file), trained["logits"])
    out = convert_zero_checkpoint_to_fp32_state_dict(root, tmp_path / "fp32", safe_serialization=True)
    assert out.name == "fp32.safetensors" and set(safetensors.load_file(out)) == set(loaded)


def test_a_checkpoint_without_the_module_record_exports_what_it_holds_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "ckpt"
    run_ranks(train_and_save, 2, str(root), 1, True)
    with caplog.at_level(logging.WARNING, logger="zero_ckpt"):
        state = get_fp32_state_dict_from_zero_checkpoint(root)
    assert "does not record its module's state_dict" in caplog.text
    assert set(TiedNet().state_dict()) - set(state) == {"head.weight"}, "all but the tied head's second name"
    model = fresh()
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["head.weight"] and not result.unexpected_keys
    assert main(["ckpt", "export", str(root), str(tmp_path / "old.pt")]) == 0
    err = capsys.readouterr().err
    assert "zero ckpt export: warning: checkpoint" in err and "wrote" in err, err
    assert set(torch.load(tmp_path / "old.pt", weights_only=True)) == set(state)


def test_safetensors_missing_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "ckpt"
    run_ranks(train_and_save, 1, str(root), 1)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert main(["ckpt", "export", str(root), str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'zero-ckpt[safetensors]'" in err and err.strip().count("\n") == 1, err  # reading + error
    assert not list(tmp_path.glob("m.safetensors*")), "no file, not even a partial one"


def test_zero_to_fp32_is_where_deepspeed_has_it():
    import zero_all as deepspeed

    module = deepspeed.utils.zero_to_fp32
    assert module.get_fp32_state_dict_from_zero_checkpoint is get_fp32_state_dict_from_zero_checkpoint
    assert deepspeed.utils.logger.name == "zero_all" and callable(deepspeed.utils.log_dist)
