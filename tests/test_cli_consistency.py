"""One CLI pattern: every model command takes the same model sources and shared flags; `import`; CLI bug fixes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from convforge.cli import all_commands, build_parser, main
from convforge.cli.train import summary_rows
from convforge.data import load
from convforge.models import create_model
from convforge.train.checkpoint import save_checkpoint
from helpers import SHARED, TINY_SYNTH, make_image_folder, save_image

MODEL_COMMANDS = ("eval", "predict", "segment", "upscale", "bench", "export", "quantize", "prune", "filters", "explain",
                  "robust", "serve")
SOURCE_FLAGS = ("--model", "--weights", "--mean", "--std", "--num-classes", "--in-chans", "--model-arg")
RUNTIME_FLAGS = ("--device", "--threads", "--json")
# extra arguments each command needs besides the model source
EXTRA = {"predict": ["img.png"], "segment": ["img.png", "--out", "m.png"], "upscale": ["img.png", "--out", "u.png"],
         "prune": ["--method", "l1-filter", "--target-macs", "0.5"], "explain": ["img.png", "--out", "d"]}
SOURCES = {"checkpoint": ["run/best.safetensors"], "registry": ["resnet20"],
           "weights": ["--model", "resnet20", "--weights", "w.pth"]}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_help_of_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    listing = capsys.readouterr().out
    for command in all_commands():
        assert command.name in listing
        with pytest.raises(SystemExit) as info:
            main([command.name, "--help"])
        assert info.value.code == 0
        assert f"usage: convforge {command.name}" in capsys.readouterr().out


def test_one_registration_style():
    names = [c.name for c in all_commands()]
    assert len(names) == len(set(names))
    assert set(MODEL_COMMANDS) | {"train", "recipes", "models", "import", "report"} == set(names)


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_model_commands_share_sources_and_runtime_flags(command):
    parser = _subparsers()[command]
    options = _options(parser)
    for flag in SOURCE_FLAGS + RUNTIME_FLAGS:
        assert flag in options, (command, flag)
    assert "source" in {a.dest for a in parser._actions if not a.option_strings}
    assert options["--mean"].nargs == "+" and options["--mean"].type is float
    assert options["--num-classes"].type is int and options["--threads"].type is int
    assert options["--model-arg"].dest == "model_args"
    if command != "filters":  # filters runs no batches and reads no images
        assert options["--batch-size"].dest == "batch_size" and "--batch" in options
        assert options["--image-size"].type is options["--image-size"].type  # one parser: parse_image_size
        from convforge.cli.common import parse_image_size

        assert options["--image-size"].type is parse_image_size
        if command != "bench":  # bench takes a comma-separated list of batch sizes
            assert options["--batch-size"].type is int
    if command in ("eval", "predict", "segment", "upscale"):
        assert "--tta" in options


def test_train_accepts_tta_as_alias_of_eval_tta():
    args = build_parser().parse_args(["train", "--tta"])
    assert args.eval_tta is True


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_model_command_parses_every_source(command, source):
    args = build_parser().parse_args([command, *SOURCES[source], *EXTRA.get(command, [])])
    if source == "weights":
        assert args.model == "resnet20" and args.weights == "w.pth"
    else:
        assert args.source == SOURCES[source][0]


@pytest.fixture
def small_sources(tmp_path):
    """A smallcnn for TINY_SYNTH as a checkpoint and as a foreign weight file, and the data."""
    torch.manual_seed(0)
    data = load(TINY_SYNTH)
    model = create_model("smallcnn", num_classes=3, in_chans=3)
    meta = {"model": {"name": "smallcnn", "args": {}, "num_classes": 3, "in_chans": 3}, "classes": data.classes,
            "input_size": [3, 8, 8], "normalization": {"mean": list(data.mean), "std": list(data.std)},
            "data": {"spec": TINY_SYNTH}}
    ckpt = save_checkpoint(tmp_path / "small.safetensors", model, meta)
    weights = tmp_path / "small.pth"
    torch.save(model.state_dict(), weights)
    norm = ["--mean", *map(str, data.mean), "--std", *map(str, data.std)]
    return {"checkpoint": [str(ckpt)], "weights": ["--model", "smallcnn", "--weights", str(weights), *norm],
            "registry": ["smallcnn", *norm], "data": data, "norm": norm}


def _json(capsys, *argv) -> dict:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_eval_export_bench_run_with_every_source(tmp_path, capsys, small_sources):
    describe = {"checkpoint": [], "weights": ["--in-chans", "3", "--num-classes", "3"],
                "registry": ["--in-chans", "3", "--num-classes", "3"]}
    results = {}
    for name in ("checkpoint", "weights", "registry"):
        source = [*small_sources[name], *describe[name]]
        data = [] if name == "checkpoint" else ["--data", TINY_SYNTH]
        results[name] = _json(capsys, "eval", *source, *data, "--json")
        assert results[name]["images"] == 32
        exported = _json(capsys, "export", *source, "--out", tmp_path / f"{name}.onnx", "--json")
        assert exported["max_abs_diff"] <= 1e-4
        bench = _json(capsys, "bench", *source, "--image-size", "8", "--batch-size", "1", "--backend", "torch",
                      "--warmup", "0", "--repeats", "1", "--threads", "1", "--json")
        assert bench["input_size"] == [3, 8, 8]
    # the same weights and normalisation: the same result, whatever the source
    assert results["checkpoint"]["top1"] == results["weights"]["top1"]
    assert results["checkpoint"]["confusion"] == results["weights"]["confusion"]
    assert any("untrained" in note for note in results["registry"]["notes"])


def test_import_then_eval_equals_eval_of_the_foreign_weights(tmp_path, capsys):
    reference = SHARED / "reference-weights" / "resnet20-12fca82f.th"
    if reference.is_file():
        weights = reference
        norm = ["--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]
    else:
        torch.manual_seed(0)
        weights = tmp_path / "resnet20.pth"
        torch.save(create_model("resnet20", num_classes=10).state_dict(), weights)
        norm = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    data = "synthetic:size=32"
    out = tmp_path / "imported.safetensors"
    imported = _json(capsys, "import", weights, "--model", "resnet20", "--data", data, *norm, "--out", out, "--json")
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["task"] == "classify" and sidecar["input_size"] == [3, 32, 32]
    assert sidecar["imported_from"] == str(weights) and sidecar["data"]["spec"] == data
    assert imported["normalization"]["std"] == sidecar["normalization"]["std"] == [float(v) for v in norm[-3:]]
    own = _json(capsys, "eval", out, "--json")
    foreign = _json(capsys, "eval", "--model", "resnet20", "--weights", weights, "--data", data, *norm, "--json")
    for key in ("top1", "top5", "loss", "per_class", "confusion", "classes", "images", "mean", "std"):
        assert own[key] == foreign[key], key


def test_import_without_normalisation_is_a_clear_error(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    torch.save(create_model("resnet20", num_classes=3).state_dict(), weights)
    code = main(["import", str(weights), "--model", "resnet20", "--classes", "a,b,c", "--out", str(tmp_path / "x")])
    assert code == 2 and "--mean and --std" in capsys.readouterr().err
    code = main(["import", str(weights), "--model", "resnet20", "--classes", "a,b,c", "--mean", "0.5", "0.5", "0.5",
                 "--std", "0.2", "0.2", "0.2", "--image-size", "24", "--out", str(tmp_path / "x.safetensors")])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "x.json").read_text())
    assert meta["classes"] == ["a", "b", "c"] and meta["input_size"] == [3, 24, 24]


def test_eval_uses_the_checkpoint_trained_image_size(tmp_path, capsys, monkeypatch):
    """A checkpoint trained with --image-size 8 on 16x16 image folders is evaluated at 8x8 by default."""
    root = tmp_path / "pets"
    make_image_folder(root, {"train": 2, "test": 2}, classes=("cat", "dog"), size=(16, 16))
    model = create_model("smallcnn", num_classes=2, in_chans=3)
    meta = {"model": {"name": "smallcnn", "args": {}, "num_classes": 2, "in_chans": 3}, "classes": ["cat", "dog"],
            "input_size": [3, 8, 8], "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
            "data": {"spec": f"imagefolder:{root}"}, "recipe": {"image_size": 8}}
    path = save_checkpoint(tmp_path / "c.safetensors", model, meta)
    import convforge.train.inference as inference

    sizes = []
    real = inference.load_data
    monkeypatch.setattr(inference, "load_data", lambda spec, size=None, skip=False: sizes.append(size) or
                        real(spec, size, skip))
    default = _json(capsys, "eval", path, "--json")
    explicit = _json(capsys, "eval", path, "--image-size", "8", "--json")
    assert sizes == [8, 8]
    assert default["loss"] == explicit["loss"] and default["images"] == 4


def _segment_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, in_chans=3, base_width=4)
    meta = {"task": "segment", "ignore_index": 255,
            "model": {"name": "unet", "args": {"base_width": 4}, "num_classes": 3, "in_chans": 3},
            "classes": ["dark", "bright", "red"], "input_size": [3, 32, 40],
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    return save_checkpoint(tmp_path / "seg.safetensors", model, meta)


def test_predict_on_a_segmentation_checkpoint(tmp_path, capsys):
    path = _segment_checkpoint(tmp_path)
    images = [save_image(tmp_path / f"i{i}.png", np.random.default_rng(i).integers(0, 255, (20, 24, 3), np.uint8))
              for i in range(2)]
    result = _json(capsys, "predict", path, *images, "--out", tmp_path / "masks", "--json")
    assert result["task"] == "segment" and len(result["predictions"]) == 2
    for item in result["predictions"]:
        assert Path(item["mask"]).is_file() and Path(item["overlay"]).is_file()
        assert abs(sum(item["class_shares"].values()) - 100) < 0.1
    segmented = _json(capsys, "segment", path, images[0], "--out", tmp_path / "one.png", "--json")
    assert segmented["class_shares"] == result["predictions"][0]["class_shares"]
    assert main(["predict", str(path), str(images[0])]) == 0  # human output too
    assert str(images[0]) in capsys.readouterr().out


def test_train_summary_of_a_segment_run_prints_its_metrics():
    summary = {"task": "segment", "test_top1": None, "test_top5": None, "best_top1": None, "best_score": 61.5,
               "best_metric": "test_miou", "best_epoch": 2, "best_selected_on": "test",
               "metrics": {"test_miou": 61.5, "test_pixel_acc": 80.25, "test_loss": 0.5},
               "params": 1000, "macs": 2e6, "wall_time_s": 1.0, "train_time_s": 0.5, "images_per_s": 10.0,
               "run_dir": "runs/x"}
    rows = dict(summary_rows(summary))
    assert rows["test miou"] == "61.50%" and rows["test pixel acc"] == "80.25%" and rows["test loss"] == "0.5000"
    assert rows["best"].startswith("61.50% at epoch 2") and "test top-1" not in rows


@pytest.mark.slow
def test_train_segment_without_json_prints_the_summary(tmp_path, capsys):
    root = tmp_path / "seg"
    root.mkdir()
    (root / "classes.txt").write_text("0 dark\n1 mid\n2 bright\n")
    for split, count in (("train", 4), ("test", 2)):
        for i in range(count):
            mask = np.random.default_rng(i).integers(0, 3, (16, 16)).astype(np.uint8)
            save_image(root / split / "images" / f"f{i}.png", (mask[..., None] * 100).repeat(3, 2).astype(np.uint8))
            save_image(root / split / "masks" / f"f{i}.png", mask)
    code = main(["train", "--task", "segment", "--model", "unet", "--model-arg", "base_width=4", "--data",
                 f"segfolder:{root}", "--epochs", "1", "--batch-size", "2", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    assert "run summary" in out and "test miou" in out
