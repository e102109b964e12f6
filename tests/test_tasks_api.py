"""The task and callback APIs from outside the package: a toy denoising task, registered here, is trained,
resumed bit-exactly, evaluated from its checkpoint and reported without any engine code knowing it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge import TrainConfig, fit
from convforge.errors import ConfigError
from convforge.models import create_model
from convforge.models.registry import register_model, unregister_model
from convforge.train import TrainingInterrupted, load_checkpoint
from convforge.train.callbacks import Callback
from convforge.train.tasks import Task, get_task, register_task, task_names, unregister_task

SIDE = 8


class TinyDenoiser(nn.Module):
    """Two convolutions that predict the noise-free image."""

    task = "toy-denoise"

    def __init__(self, num_classes: int = 1, in_chans: int = 1, width: int = 6) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, in_chans, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)




@dataclass
class Pairs:
    """Noisy inputs and clean targets."""

    noisy: torch.Tensor
    clean: torch.Tensor

    def __len__(self) -> int:
        return len(self.clean)


@dataclass
class ToyData:
    train: Pairs
    test: Pairs
    spec: str
    val: Any = None
    channels: int = 1
    num_classes: int = 1
    image_size: tuple[int, int] = (SIDE, SIDE)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    default_augment: str = "none"
    notes: tuple[str, ...] = ()

    def split(self, name: str) -> Pairs:
        return getattr(self, name)


def _pairs(count: int, seed: int) -> Pairs:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, SIDE // 2, SIDE // 2, generator=generator)
    clean = F.interpolate(coarse, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return Pairs(clean + 0.2 * torch.randn(clean.shape, generator=generator), clean)


class PairLoader:
    """Shuffled batches, the same order for the same epoch (what bit-exact resume needs)."""

    def __init__(self, pairs: Pairs, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def __len__(self) -> int:
        return len(self.pairs) // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def iter_from(self, start: int):
        order = torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        for index in range(start, len(self)):
            first = (index * self.world_size + self.rank) * self.batch_size
            chosen = order[first:first + self.batch_size]
            yield self.pairs.noisy[chosen], self.pairs.clean[chosen]


def snr_db(output: torch.Tensor, clean: torch.Tensor) -> float:
    noise = float(F.mse_loss(output, clean))
    return 10 * math.log10(float(clean.pow(2).mean()) / max(noise, 1e-12))


class ToyDenoiseTask(Task):
    """Denoise 8x8 grey images; the signal-to-noise ratio (dB, higher is better) selects the best checkpoint."""

    name = "toy-denoise"
    primary = "snr"
    unit = " dB SNR"
    outputs_are_classes = False

    def load_data(self, cfg, log):
        return ToyData(train=_pairs(96, 1), test=_pairs(32, 2), spec=cfg.data)

    def build_model(self, cfg, data, model_args):
        return create_model(cfg.model, num_classes=1, in_chans=data.channels, **model_args)

    def train_loader(self, data, cfg, model, device, rank, world_size):
        return PairLoader(data.train, cfg.batch_size, cfg.seed, rank, world_size)

    def loss(self, output, target, cfg, data):
        return F.mse_loss(output, target)

    def evaluate(self, model, data, split, cfg, device, rank, world_size):
        pairs = data.split(split)
        model.eval()
        with torch.no_grad():
            output = model(pairs.noisy.to(device)).cpu()
        model.train()
        return {"loss": float(F.mse_loss(output, pairs.clean)), "snr": snr_db(output, pairs.clean)}

    def meta(self, data):
        return {"noise": 0.2}


@pytest.fixture(autouse=True, scope="module")
def _toy_registered():
    """The toy model and task exist for this module's tests only (other tests list every model and task)."""
    register_model("toy-denoiser", family="test", input_size=(1, SIDE, SIDE), num_classes=1)(TinyDenoiser)
    register_task(ToyDenoiseTask())
    yield
    unregister_model("toy-denoiser")
    unregister_task("toy-denoise")


def _config(run, **changes) -> TrainConfig:
    values = dict(task="toy-denoise", model="toy-denoiser", data="toy:noise", epochs=3, batch_size=16, lr=0.02,
                  optimizer="adamw", out=str(run), device="cpu", seed=3)
    values.update(changes)
    return TrainConfig(**values)


def _state(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model.state_dict()


def test_registered_task_trains_resumes_evaluates_and_reports(tmp_path):
    assert "toy-denoise" in task_names() and get_task("toy-denoise").primary == "snr"
    with pytest.raises(ConfigError, match="classification only"):
        _config(tmp_path / "x", mixup_alpha=0.2).validate()

    whole = fit(_config(tmp_path / "whole"), quiet=True)
    assert whole["status"] == "completed" and whole["task"] == "toy-denoise"
    assert whole["best_metric"] == "test_snr" and "test_snr" in whole["metrics"]
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["test_snr"] > records[0]["test_snr"] - 1
    assert " dB SNR" in (tmp_path / "whole" / "train.log").read_text()

    def stop_after_first(epoch: int, record: dict[str, Any]) -> None:
        if epoch == 1:
            raise TrainingInterrupted()

    with pytest.raises(TrainingInterrupted):
        fit(_config(tmp_path / "split"), on_epoch_end=stop_after_first, quiet=True)
    resumed = fit(TrainConfig(resume=str(tmp_path / "split")), quiet=True)
    assert resumed["epochs"] == 3
    left, right = _state(tmp_path / "whole" / "last.safetensors"), _state(tmp_path / "split" / "last.safetensors")
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)

    ckpt = load_checkpoint(tmp_path / "whole" / "best.safetensors")
    assert ckpt.meta["task"] == "toy-denoise" and ckpt.meta["noise"] == 0.2 and ckpt.meta["classes"] == []
    task = get_task(ckpt.meta["task"])
    cfg = _config(tmp_path / "whole")
    data = task.load_data(cfg, print)
    scores = task.evaluate(ckpt.model, data, "test", cfg, torch.device("cpu"), 0, 1)
    assert scores["snr"] == pytest.approx(whole["best_score"], abs=1e-4)

    from convforge.report import write_report

    page = write_report([tmp_path / "whole"], tmp_path / "report.html").read_text()
    assert "snr" in page and "toy-denoiser" in page
    assert "Evaluation: snr" in page and "evaluation on toy:noise failed" not in page


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_start(self, state):
        self.calls.append("start")

    def on_epoch_end(self, state, record):
        self.calls.append(f"epoch {record['epoch']}")
        record["custom"] = {"seen_by": "recorder", "epoch": state.epoch + 1}

    def on_epoch_saved(self, state, record):
        self.calls.append(f"saved {record['epoch']}")

    def on_end(self, state, summary):
        self.calls.append("end")
        summary["custom"] = True

    def close(self, state):
        self.calls.append("close")


def test_callback_sees_each_point_in_order_and_adds_to_metrics(tmp_path):
    recorder = Recorder()
    summary = fit(_config(tmp_path / "run", epochs=2), callbacks=[recorder], quiet=True)
    assert recorder.calls == ["start", "epoch 1", "saved 1", "epoch 2", "saved 2", "end", "close"]
    assert summary["custom"] is True
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["custom"] for r in records] == [{"seen_by": "recorder", "epoch": 1}, {"seen_by": "recorder", "epoch": 2}]


def test_callback_closes_after_an_interrupt(tmp_path):
    recorder = Recorder()

    class Stop(Callback):
        def on_epoch_saved(self, state, record):
            raise TrainingInterrupted(130)

    with pytest.raises(TrainingInterrupted):
        fit(_config(tmp_path / "run"), callbacks=[recorder, Stop()], quiet=True)
    assert recorder.calls == ["start", "epoch 1", "saved 1", "close"]
