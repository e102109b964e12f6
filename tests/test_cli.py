"""The ``convforge`` command, run as a subprocess (``python -m convforge``) like a user would."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import convforge
from convforge import load_checkpoint
from convforge.cli import main
from convforge.data import load
from helpers import read_jsonl, run_cli, save_image

pytestmark = pytest.mark.slow  # every test here starts at least one Python process


@pytest.mark.parametrize("command", ["train", "eval", "predict", "models"])
def test_help_for_every_subcommand(tmp_path, command):
    result = run_cli(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"usage: convforge {command}" in result.stdout
    assert "--json" in result.stdout


def test_top_level_help_lists_commands(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("train", "eval", "predict", "models"):
        assert command in result.stdout
    version = run_cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and convforge.__version__ in version.stdout


def test_train_json_prints_one_object(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--epochs", "2", "--out", out, "--json", "--model-arg", "widths=[8, 16]",
                     "--batch-size", "128", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    summary = json.loads(result.stdout)
    assert isinstance(summary["test_top1"], float) and 0 <= summary["test_top1"] <= 100
    assert summary["status"] == "completed" and summary["epochs"] == 2 and summary["data"] == "digits"
    assert summary["run_dir"] == str(out)
    assert summary == json.loads((out / "summary.json").read_text())
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    # progress went to stderr
    assert "epoch 2/2" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_train_yaml_config_and_command_line_priority(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({
        "data": "synthetic:classes=3,size=8,train=64,test=32", "epochs": 5, "batch-size": 16, "seed": 4,
        "optimizer": "adamw", "model_args": {"widths": [8, 16]},
    }))
    out = tmp_path / "run"
    result = run_cli("train", "--config", config, "--epochs", "2", "--seed", "9", "--out", out, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 2 and summary["data"].startswith("synthetic:")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["seed"] == 9  # command line wins
    assert saved["batch_size"] == 16 and saved["optimizer"] == "adamw" and saved["model_args"] == {"widths": [8, 16]}
    assert len(read_jsonl(out / "metrics.jsonl")) == 2


def test_train_human_output(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--data", "synthetic:classes=3,size=8,train=64,test=32", "--epochs", "1",
                     "--batch-size", "16", "--model-arg", "widths=[4, 8]", "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "run summary" in result.stdout and "test top-1" in result.stdout and str(out) in result.stdout


def test_eval_run_dir_json(tmp_path, digits_run):
    run_dir = digits_run["run_dir"]
    result = run_cli("eval", run_dir, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("top1", "top5", "per_class", "confusion", "loss", "images", "classes"):
        assert key in report, key
    best = json.loads((run_dir / "best.json").read_text())
    assert report["top1"] == pytest.approx(best["metrics"]["test_top1"])
    assert report["images"] == 360 and report["split"] == "test" and report["model"] == "smallcnn"
    assert len(report["per_class"]) == 10 and len(report["confusion"]) == 10
    assert sum(map(sum, report["confusion"])) == 360
    assert report["top5"] >= report["top1"]
    correct = sum(report["confusion"][i][i] for i in range(10))
    assert report["top1"] == pytest.approx(100 * correct / 360)


def test_eval_tta_and_train_split(tmp_path, digits_run):
    result = run_cli("eval", digits_run["run_dir"] / "last.json", "--split", "train", "--tta", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 1437 and report["tta"] is True and report["split"] == "train"


def test_eval_human_output(digits_run, capsys):
    assert main(["eval", str(digits_run["run_dir"])]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "per-class accuracy" in out and "confusion matrix" in out


def test_predict_json(tmp_path, digits_run):
    data = load("digits")
    images = [save_image(tmp_path / f"digit{i}.png", data.test.images[i, 0].numpy()) for i in range(2)]
    result = run_cli("predict", digits_run["run_dir"], *images, "--top-k", "3", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checkpoint"].endswith("best.safetensors")
    assert [p["image"] for p in report["predictions"]] == [str(p) for p in images]
    ckpt = load_checkpoint(digits_run["run_dir"])
    with torch.no_grad():
        expected = ckpt.model(convforge.data.normalize(data.test.images[:2], ckpt.mean, ckpt.std)).argmax(1)
    for item, want in zip(report["predictions"], expected.tolist()):
        probabilities = [t["probability"] for t in item["top"]]
        assert len(probabilities) == 3
        assert all(0 <= p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-6
        assert probabilities == sorted(probabilities, reverse=True)
        assert item["top"][0]["index"] == want and item["top"][0]["class"] == str(want)


def test_predict_human_output_rgb_image(tmp_path, digits_run):
    import numpy as np

    # an RGB image of another size is resized and converted to the checkpoint's 1x8x8
    image = save_image(tmp_path / "photo.jpg", np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    result = run_cli("predict", digits_run["run_dir"] / "last.safetensors", image, "--top-k", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{image}: ") and result.stdout.count("%") == 2


def test_models_json(tmp_path):
    result = run_cli("models", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["models"]}
    assert set(rows) == set(convforge.list_models())
    assert rows["resnet20"]["params"] == 269_722 and 40e6 <= rows["resnet20"]["macs"] <= 41.5e6
    assert rows["resnet56"]["params"] == 853_018
    assert rows["resnet20"]["input_size"] == [3, 32, 32] and rows["resnet20"]["family"] == "resnet_cifar"
    assert rows["smallcnn"]["params"] > 0


def test_models_pattern(tmp_path):
    result = run_cli("models", "resnet4*", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resnet44" in result.stdout and "resnet20" not in result.stdout and "smallcnn" not in result.stdout
    assert "1 model(s)" in result.stdout


def test_eval_foreign_pth_with_module_prefix(tmp_path):
    torch.manual_seed(0)
    model = convforge.create_model("resnet20", num_classes=10)
    path = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    result = run_cli("eval", "--model", "resnet20", "--weights", path, "--data", "synthetic:size=32", "--json",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "resnet20" and report["weights"] == str(path) and report["images"] == 128
    assert any("no --mean/--std" in note for note in report["notes"])
    data = load("synthetic:size=32")
    expected = convforge.evaluate(model.eval(), data.test, data.mean, data.std, num_classes=10)
    assert report["top1"] == pytest.approx(expected["top1"])
    assert report["loss"] == pytest.approx(expected["loss"], rel=1e-4)
