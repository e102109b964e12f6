"""The training engine: accuracy on digits, the run directory, training options, schedules and configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from convforge import TrainConfig, fit
from convforge.cli import build_parser
from convforge.cli.train import train_config as _train_config
from convforge.config import coerce_fields, dump_yaml, load_yaml
from convforge.errors import ConfigError, DataError
from convforge.train.optim import build_optimizer, lr_at, param_groups
from helpers import TINY_SYNTH, make_image_folder, read_jsonl

RECORD_KEYS = {"epoch", "train_loss", "train_top1", "test_top1", "lr", "images_per_s", "train_time_s"}


def test_digits_reaches_90_percent(digits_run):
    summary = digits_run["summary"]
    assert summary["status"] == "completed"
    assert summary["test_top1"] > 90.0
    assert summary["test_top5"] >= summary["test_top1"]
    assert summary["epochs"] == 3 and summary["model"] == "smallcnn" and summary["data"] == "digits"
    assert summary["best_selected_on"] == "test"
    assert 1 <= summary["best_epoch"] <= 3
    assert summary["params"] > 0 and summary["macs"] > 0
    assert summary["device"] == "cpu"


def test_run_dir_contents(digits_run):
    run_dir = digits_run["run_dir"]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "best.safetensors", "best.json",
                 "last.safetensors", "last.json", "resume.safetensors", "train.log"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*.tmp")), "no temporary files may be left"

    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for record in records:
        assert RECORD_KEYS <= set(record)
        assert math.isfinite(record["train_loss"]) and 0 <= record["test_top1"] <= 100
        assert record["lr"] > 0 and record["images_per_s"] > 0 and record["train_time_s"] > 0
    # training makes progress
    assert records[-1]["train_loss"] < records[0]["train_loss"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == json.loads(json.dumps(digits_run["summary"]))
    assert summary["test_top1"] == records[-1]["test_top1"]
    assert summary["best_top1"] == max(r["test_top1"] for r in records)

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["epochs"] == 3 and config["model"] == "smallcnn" and config["model_args"] == {"widths": [16, 32, 64]}
    # resolved values are written, not None
    assert config["lr"] == pytest.approx(0.1 * 64 / 128) and config["augment"] == "none"
    assert TrainConfig.from_dict(config).epochs == 3

    log = (run_dir / "train.log").read_text()
    assert "start: model=smallcnn" in log and "epoch 3/3" in log and "done: test top-1" in log


def _tiny(tmp_path, name="run", **overrides):
    values = dict(model="smallcnn", data=TINY_SYNTH, epochs=2, batch_size=16, model_args={"widths": [8, 16]},
                  out=str(tmp_path / name))
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("options", [
    {"optimizer": "adamw"},
    {"schedule": "cosine"},
    {"schedule": "constant"},
    {"label_smoothing": 0.1},
    {"ema": True},
    {"grad_clip": 1.0},
    {"channels_last": True},
    {"amp": True},
    {"augment": "crop-flip", "crop_padding": 1},
    {"optimizer": "adamw", "schedule": "cosine", "ema": True, "label_smoothing": 0.05, "nesterov": False},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_training_options_run(tmp_path, options):
    summary = fit(_tiny(tmp_path, **options), quiet=True)
    assert summary["status"] == "completed"
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 2
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]) for r in records)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    for key, value in options.items():
        assert saved[key] == value
    meta = json.loads((tmp_path / "run" / "last.json").read_text())
    assert meta["weights"] == ("ema" if options.get("ema") else "trained")
    for key, value in options.items():
        assert meta["recipe"][key] == value


def test_grad_clip_is_applied(tmp_path, monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    fit(_tiny(tmp_path, grad_clip=0.5), quiet=True)
    assert calls == [0.5] * (2 * (64 // 16))


def test_constant_and_cosine_schedules_in_metrics(tmp_path):
    fit(_tiny(tmp_path, "const", schedule="constant", warmup_epochs=0, lr=0.01, epochs=3), quiet=True)
    assert [r["lr"] for r in read_jsonl(tmp_path / "const" / "metrics.jsonl")] == [0.01, 0.01, 0.01]
    fit(_tiny(tmp_path, "cos", schedule="cosine", warmup_epochs=0, lr=0.01, epochs=3), quiet=True)
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "cos" / "metrics.jsonl")]
    assert lrs[0] > lrs[1] > lrs[2] >= 0 and lrs[0] <= 0.01


def test_eval_every(tmp_path):
    fit(_tiny(tmp_path, epochs=3, eval_every=2), quiet=True)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert ["test_top1" in r for r in records] == [False, True, True]  # the last epoch is always evaluated


def test_val_split_selects_best(tmp_path):
    root = tmp_path / "folder"
    make_image_folder(root, {"train": 6, "val": 2, "test": 2}, classes=("a", "b"), size=(8, 8))
    summary = fit(_tiny(tmp_path, data=f"imagefolder:{root}", batch_size=4), quiet=True)
    assert summary["best_selected_on"] == "val"
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all("val_top1" in r and "test_top1" in r for r in records)
    assert summary["best_top1"] == max(r["val_top1"] for r in records)


def test_existing_run_dir_is_refused(tmp_path):
    fit(_tiny(tmp_path, epochs=1), quiet=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        fit(_tiny(tmp_path, epochs=1), quiet=True)


def test_train_needs_train_split(tmp_path):
    root = tmp_path / "evalonly"
    make_image_folder(root, {"test": 2}, classes=("a", "b"))
    with pytest.raises(DataError, match="no train split"):
        fit(_tiny(tmp_path, data=f"imagefolder:{root}"), quiet=True)


def test_batch_larger_than_dataset(tmp_path):
    with pytest.raises(ConfigError, match="lower --batch-size"):
        fit(_tiny(tmp_path, batch_size=1000), quiet=True)


# ---------------------------------------------------------------- schedules and optimizers


def test_lr_at_onecycle():
    peak, total, warm = 0.4, 100, 10
    assert lr_at(0, total, warm, peak, "onecycle") == pytest.approx(peak / 25 + (peak - peak / 25) / warm)
    assert lr_at(warm - 1, total, warm, peak, "onecycle") == pytest.approx(peak)
    assert lr_at(warm, total, warm, peak, "onecycle") == pytest.approx(peak)
    assert lr_at(total, total, warm, peak, "onecycle") == pytest.approx(peak / 1e4)
    values = [lr_at(s, total, warm, peak, "onecycle") for s in range(warm, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_at_cosine_and_constant():
    assert lr_at(0, 10, 0, 1.0, "cosine") == pytest.approx(1.0)
    assert lr_at(5, 10, 0, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(10, 10, 0, 1.0, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, 10, 4, 1.0, "constant") == pytest.approx(0.25)
    assert all(lr_at(s, 10, 4, 1.0, "constant") == 1.0 for s in range(3, 10))


def test_no_weight_decay_on_norm_and_bias():
    from convforge import create_model

    model = create_model("resnet20", num_classes=10)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    cfg = TrainConfig(optimizer="adamw").resolved(3, (32, 32), "none")
    assert isinstance(build_optimizer(model, cfg), torch.optim.AdamW)
    sgd = build_optimizer(model, TrainConfig().resolved(3, (32, 32), "none"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"] is True


# ---------------------------------------------------------------- configuration


def test_resolved_defaults():
    cfg = TrainConfig(batch_size=256).resolved(3, (32, 32), "crop-flip")
    assert cfg.lr == pytest.approx(0.2) and cfg.weight_decay == 5e-4
    assert cfg.augment == "crop-flip" and cfg.crop_padding == 4
    assert cfg.warmup_epochs == 2.0
    adam = TrainConfig(optimizer="adamw", epochs=4, lr=1e-3).resolved(1, (8, 8), "none")
    assert adam.lr == 1e-3 and adam.weight_decay == 0.05 and adam.warmup_epochs == 0.6 and adam.crop_padding == 1
    assert TrainConfig().lr is None  # resolving makes a copy


@pytest.mark.parametrize("field,value,match", [
    ("epochs", 0, "epochs must be in 1.."),
    ("batch_size", 0, "batch_size"),
    ("optimizer", "rmsprop", "optimizer must be one of sgd, adamw"),
    ("schedule", "staircase", "schedule must be one of"),
    ("lr", -1.0, "lr must be > 0"),
    ("label_smoothing", 1.0, "label_smoothing"),
    ("ema_decay", 1.0, "ema_decay"),
    ("warmup_epochs", 100.0, "warmup_epochs"),
    ("grad_clip", 0.0, "grad_clip"),
    ("device", "tpu", "device must be"),
    ("threads", 0, "threads"),
])
def test_validate(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{field: value}).validate()


def test_coerce_fields():
    values = coerce_fields({"batch-size": 32, "lr": 1, "ema": True, "model_args": {"widths": [4]}}, "src")
    assert values == {"batch_size": 32, "lr": 1.0, "ema": True, "model_args": {"widths": [4]}}
    assert isinstance(values["lr"], float)
    with pytest.raises(ConfigError, match="src: option 'epochs' must be an integer"):
        coerce_fields({"epochs": "ten"}, "src")
    with pytest.raises(ConfigError, match="must be true or false"):
        coerce_fields({"ema": "yes"}, "src")
    with pytest.raises(ConfigError, match="may not be empty"):
        coerce_fields({"epochs": None}, "src")
    with pytest.raises(ConfigError, match="did you mean epochs"):
        coerce_fields({"epoch": 3}, "src")


def test_yaml_round_trip_and_errors(tmp_path):
    cfg = TrainConfig(epochs=7, lr=0.3, model_args={"widths": [8, 16]}, ema=True)
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert TrainConfig.from_dict(load_yaml(path)) == cfg

    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(bad)
    assert "learning_rate" in str(info.value) and str(bad) in str(info.value)
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(listing)


def test_cli_options_win_over_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 9\nbatch-size: 16\nlr: 0.5\nema: true\nmodel_args:\n  widths: [8, 16]\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "2", "--no-ema",
                                      "--model-arg", "widths=[4, 8]", "--seed", "5"])
    cfg = _train_config(args)
    assert cfg.epochs == 2 and cfg.ema is False and cfg.seed == 5  # command line
    assert cfg.batch_size == 16 and cfg.lr == 0.5  # file
    assert cfg.model_args == {"widths": [4, 8]}
    assert cfg.optimizer == "sgd"  # default
