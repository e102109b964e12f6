"""An interrupted and resumed run ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convforge import TrainConfig, fit
from convforge.data import BatchLoader
from convforge.errors import CheckpointError
from convforge.train import TrainingInterrupted
from helpers import read_jsonl

DATA = "synthetic:classes=4,size=8,train=256,test=64"
EPOCHS = 4
RECIPES = {
    "sgd": {},
    "adamw-ema": {"optimizer": "adamw", "ema": True},
    "adv-fgsm-rs": {"adv_train": "fgsm-rs", "adv_eval_samples": 16},  # random starts seeded per batch
    "adv-trades": {"adv_train": "trades", "adv_eval_samples": 0},
    # BatchNorm frozen from epoch 3; the activation ranges (EMA) are model buffers, compared with the weights
    "qat-int8": {"qat": "int8", "qat_freeze_bn_fraction": 0.5},
    "binary": {"binary": "weights+activations"},
    # airbench94's pieces: Lookahead state, 64x norm lr, alternating flips (per-run draw), reflect crops, shift TTA
    "airbench": {"lookahead": True, "norm_lr_scale": 64.0, "decay_all": True, "schedule": "triangle",
                 "momentum": 0.85, "augment": "crop-altflip", "pad_mode": "reflect", "crop_padding": 1,
                 "eval_tta": True, "eval_tta_shift": 1},
}
# Metrics that depend only on the computation (not on wall-clock time).
DETERMINISTIC_KEYS = ("epoch", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "lr")


def _config(out: Path, recipe: str) -> TrainConfig:
    return TrainConfig(model="smallcnn", data=DATA, epochs=EPOCHS, batch_size=32, threads=1, seed=1,
                       model_args={"widths": [8, 16, 32]}, out=str(out), **RECIPES[recipe])


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run per recipe."""
    runs = {}
    for recipe in RECIPES:
        out = tmp_path_factory.mktemp("reference") / recipe
        fit(_config(out, recipe), quiet=True)
        runs[recipe] = out
    return runs


def _assert_same_result(run: Path, reference: Path) -> None:
    for name in ("last.safetensors", "best.safetensors"):
        got, want = load_file(str(run / name)), load_file(str(reference / name))
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs"
    records, expected = read_jsonl(run / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert len(records) == EPOCHS
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    for got_record, want_record in zip(records, expected):
        assert {k: got_record[k] for k in DETERMINISTIC_KEYS} == {k: want_record[k] for k in DETERMINISTIC_KEYS}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == EPOCHS
    assert summary["test_top1"] == records[-1]["test_top1"]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_resume_after_epoch_boundary_is_bitwise_equal(tmp_path, reference_runs, recipe):
    run = tmp_path / "run"

    def stop_after_two(epoch, record):
        assert record["epoch"] == epoch
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        fit(_config(run, recipe), on_epoch_end=stop_after_two, quiet=True)
    assert info.value.exit_code == 130
    assert len(read_jsonl(run / "metrics.jsonl")) == 2
    assert "interrupted at epoch" in (run / "train.log").read_text()
    assert not (run / "summary.json").exists()

    summary = fit(TrainConfig(resume=str(run)), quiet=True)
    assert summary["run_dir"] == str(run)
    _assert_same_result(run, reference_runs[recipe])


@pytest.fixture
def interrupt_mid_epoch(monkeypatch):
    """Make the training loader raise KeyboardInterrupt instead of yielding batch 3 of epoch 2 (once)."""
    real = BatchLoader.iter_from
    state = {"armed": True, "fired": False}

    def iter_from(self, start_batch):
        batches = real(self, start_batch)
        if not (self.shuffle and self.epoch == 1 and state["armed"]):
            return batches

        def interrupted():
            for index, batch in enumerate(batches, start=start_batch):
                if index == 2:
                    state["armed"], state["fired"] = False, True
                    raise KeyboardInterrupt
                yield batch

        return interrupted()

    monkeypatch.setattr(BatchLoader, "iter_from", iter_from)
    return state


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_resume_mid_epoch_is_bitwise_equal(tmp_path, reference_runs, recipe, interrupt_mid_epoch):
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        fit(_config(run, recipe), quiet=True)
    assert interrupt_mid_epoch["fired"]
    assert len(read_jsonl(run / "metrics.jsonl")) == 1
    from safetensors import safe_open

    with safe_open(str(run / "resume.safetensors"), framework="pt") as handle:
        extra = json.loads(handle.metadata()["convforge"])["extra"]
    assert (extra["epoch"], extra["batch"]) == (1, 2)
    assert extra["partial"]["seen"] == 64

    fit(TrainConfig(resume=str(run)), quiet=True)
    assert "interrupted at epoch 2, batch 2; state saved" in (run / "train.log").read_text()
    _assert_same_result(run, reference_runs[recipe])


def test_resume_can_extend_a_finished_run(tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(model="smallcnn", data="synthetic:classes=3,size=8,train=64,test=32", epochs=2, batch_size=16,
                      model_args={"widths": [8, 16]}, out=str(run))
    fit(cfg, quiet=True)
    summary = fit(TrainConfig(resume=str(run), epochs=3), quiet=True)
    assert summary["epochs"] == 3
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((run / "last.json").read_text())["epoch"] == 3


def test_resume_needs_a_run_dir(tmp_path):
    (tmp_path / "notarun").mkdir()
    with pytest.raises(CheckpointError, match="no config.yaml there") as info:
        fit(TrainConfig(resume=str(tmp_path / "notarun")), quiet=True)
    assert "notarun" in str(info.value)
