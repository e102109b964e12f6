"""Bad input: each case fails with a clear message (naming the path or value) and a non-zero exit code.

The CLI cases run ``convforge.cli.main`` in-process (same code path as the command, much faster);
the ones where the process boundary matters (exit codes, pickles that would run code) use a subprocess.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from convforge import TrainConfig, load_checkpoint, fit
from convforge.cli import main
from convforge.data import load
from convforge.errors import DataError, NonFiniteLossError
from helpers import (
    TINY_SYNTH,
    make_image_folder,
    random_images,
    read_jsonl,
    run_cli,
    save_image,
    write_cifar10_batches,
)


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _tiny_train_args(out):
    return ["train", "--epochs", "1", "--batch-size", "4", "--model-arg", "widths=[4, 8]", "--out", out]


class Evil:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# ---------------------------------------------------------------- models and specs


@pytest.mark.slow
def test_unknown_model_subprocess(tmp_path):
    result = run_cli("train", "--model", "resnet21", "--out", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown model 'resnet21'" in result.stderr and "resnet20" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_unknown_model_for_foreign_weights(tmp_path, capsys):
    code, out, err = cli(capsys, "eval", "--model", "resnt56", "--weights", tmp_path / "w.pth", "--data", TINY_SYNTH)
    assert code == 2 and "unknown model 'resnt56'" in err and "resnet56" in err and out == ""


@pytest.mark.parametrize("spec", ["imagenet", "foo:bar", "mnist", ""])
def test_unknown_or_incomplete_data_spec(tmp_path, capsys, spec):
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run"), "--data", spec)
    assert code == 2
    assert f"'{spec}'" in err and ("unknown data spec" in err or "needs a directory" in err)


def test_bad_synthetic_option_cli(tmp_path, capsys):
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run"), "--data", "synthetic:classes=3,colour=2")
    assert code == 2 and "colour=2" in err


# ---------------------------------------------------------------- folders


@pytest.mark.slow
def test_missing_data_dir_subprocess(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    result = run_cli("train", "--data", f"imagefolder:{missing}", "--out", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 2
    assert "data directory not found" in result.stderr and str(missing) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["imagefolder", "mnist", "cifar10"])
def test_missing_data_dir(tmp_path, capsys, kind):
    missing = tmp_path / "missing"
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run"), "--data", f"{kind}:{missing}")
    assert code == 2 and str(missing) in err and "not found" in err


def test_data_path_is_a_file(tmp_path, capsys):
    path = tmp_path / "file.txt"
    path.write_text("x")
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run"), "--data", f"imagefolder:{path}")
    assert code == 2 and f"{path} is not a directory" in err


def test_empty_data_dir(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run"), "--data", f"imagefolder:{empty}")
    assert code == 2 and str(empty) in err and "no train/, val/ or test/ folder" in err
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run2"), "--data", f"mnist:{empty}")
    assert code == 2 and "no MNIST data" in err and str(empty) in err
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run3"), "--data", f"cifar10:{empty}")
    assert code == 2 and "no CIFAR-10 batch files" in err


def test_train_folder_without_test_or_classes(tmp_path, capsys):
    (tmp_path / "d" / "train").mkdir(parents=True)
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run"), "--data", f"imagefolder:{tmp_path / 'd'}")
    assert code == 2 and "neither 'test' nor 'val'" in err
    (tmp_path / "d" / "test").mkdir()
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run"), "--data", f"imagefolder:{tmp_path / 'd'}")
    assert code == 2 and "no class folders" in err


def test_class_folder_without_images(tmp_path, capsys):
    root = tmp_path / "pets"
    make_image_folder(root, {"train": 2, "test": 1}, classes=("cat", "dog"))
    empty_class = root / "train" / "emu"
    empty_class.mkdir()
    (empty_class / "notes.txt").write_text("no images here")
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run"), "--data", f"imagefolder:{root}")
    assert code == 2
    assert f"class folder {empty_class} holds no images" in err


# ---------------------------------------------------------------- image files


def _folder_with_bad_image(root, how):
    make_image_folder(root, {"train": 3, "test": 2}, classes=("a", "b"))
    bad = root / "train" / "b" / "broken.png"
    if how == "truncated":
        good = (root / "train" / "b" / "img000.png").read_bytes()
        bad.write_bytes(good[: len(good) // 2])
    else:
        bad.write_bytes(b"this is not an image at all")
    return bad


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_image_names_the_file(tmp_path, capsys, how):
    root = tmp_path / "pets"
    bad = _folder_with_bad_image(root, how)
    with pytest.raises(DataError) as info:
        load(f"imagefolder:{root}")
    assert str(bad) in str(info.value) and "--skip-bad-images" in str(info.value)
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run"), "--data", f"imagefolder:{root}")
    assert code == 2 and str(bad) in err and "could not be decoded" in err


def test_skip_bad_images_is_counted(tmp_path, capsys):
    root = tmp_path / "pets"
    bad = _folder_with_bad_image(root, "truncated")
    (root / "test" / "a" / "junk.jpg").write_bytes(b"\xff\xd8\xff garbage")
    data = load(f"imagefolder:{root}", skip_bad_images=True)
    assert len(data.train) == 6 and len(data.test) == 4
    note = next(n for n in data.notes if n.startswith("skipped"))
    assert note.startswith("skipped 2 unreadable image(s)") and str(bad) in note

    code, out, err = cli(capsys, *_tiny_train_args(tmp_path / "run"), "--data", f"imagefolder:{root}",
                         "--skip-bad-images", "--json")
    assert code == 0, err
    assert "note: skipped 2 unreadable image(s)" in err
    assert json.loads(out)["status"] == "completed"


def test_grayscale_and_rgb_mix_is_converted(tmp_path):
    root = tmp_path / "mix"
    make_image_folder(root, {"train": 2, "test": 1}, classes=("a", "b"), channels=3)
    gray = random_images(1, (8, 8), channels=1, seed=9)[0]
    save_image(root / "train" / "a" / "zgray.png", gray)
    data = load(f"imagefolder:{root}")
    assert data.channels == 3
    assert any("converted 1 grayscale image(s) to RGB" in note for note in data.notes)
    index = 2  # class a: img000, img001, zgray
    assert all(np.array_equal(data.train.images[index, c].numpy(), gray) for c in range(3))


def test_all_grayscale_stays_one_channel(tmp_path):
    root = tmp_path / "gray"
    make_image_folder(root, {"train": 2, "test": 1}, classes=("a", "b"), channels=1)
    data = load(f"imagefolder:{root}")
    assert data.channels == 1 and not any("converted" in n for n in data.notes)


def test_mixed_sizes_need_image_size_when_no_majority(tmp_path):
    root = tmp_path / "sizes"
    save_image(root / "train" / "a" / "x.png", random_images(1, (8, 8))[0])
    save_image(root / "train" / "b" / "y.png", random_images(1, (6, 6))[0])
    save_image(root / "test" / "a" / "z.png", random_images(1, (8, 8))[0])
    data = load(f"imagefolder:{root}")  # resized to the most common size, with a note
    assert data.image_size == (8, 8) and any("resizing all to 8x8" in n for n in data.notes)


def test_predict_missing_and_corrupt_image(tmp_path, capsys, digits_run):
    code, _, err = cli(capsys, "predict", digits_run["run_dir"], tmp_path / "nope.png")
    assert code == 2 and f"image not found: {tmp_path / 'nope.png'}" in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, _, err = cli(capsys, "predict", digits_run["run_dir"], broken)
    assert code == 2 and f"cannot read image {broken}" in err


# ---------------------------------------------------------------- training failures


@pytest.mark.slow
def test_non_finite_loss_subprocess(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--lr", "1e20", "--epochs", "2", "--model-arg", "widths=[8, 16]", "--out", out,
                     "--json", cwd=tmp_path)
    assert result.returncode == 3
    assert "loss became nan" in result.stderr or "loss became inf" in result.stderr
    assert "lower learning rate" in result.stderr
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and "lower learning rate" in summary["error"]


def test_non_finite_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from convforge.train import engine

    real = engine.lr_at
    steps_per_epoch = 64 // 16

    def nan_after_first_epoch(step, *args):
        return float("nan") if step >= steps_per_epoch else real(step, *args)

    monkeypatch.setattr(engine, "lr_at", nan_after_first_epoch)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        fit(TrainConfig(data=TINY_SYNTH, epochs=3, batch_size=16, model_args={"widths": [4, 8]}, out=str(run)),
              quiet=True)
    message = str(info.value)
    assert "epoch 2" in message and "lower learning rate" in message
    assert f"the last good checkpoint is {run / 'last.safetensors'}" in message
    assert info.value.exit_code == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["error"] == message
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.meta["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt.model.state_dict().values() if v.is_floating_point())
    assert message in (run / "train.log").read_text()


@pytest.mark.slow
def test_resume_not_a_run_dir_subprocess(tmp_path):
    folder = tmp_path / "just-a-folder"
    folder.mkdir()
    result = run_cli("train", "--resume", folder, cwd=tmp_path)
    assert result.returncode == 2
    assert f"cannot resume {folder}" in result.stderr and "config.yaml" in result.stderr


def test_resume_run_without_state(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data: '{TINY_SYNTH}'\nepochs: 1\nbatch_size: 4\n")
    code, _, err = cli(capsys, "train", "--resume", run)
    assert code == 0 and "has no saved state yet" in err and "starting it from the beginning" in err
    assert len(read_jsonl(run / "metrics.jsonl")) == 1 and (run / "last.safetensors").is_file()


def test_existing_run_dir_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*_tiny_train_args(out), "--data", TINY_SYNTH, "--json"]
    assert cli(capsys, *args)[0] == 0
    code, _, err = cli(capsys, *args)
    assert code == 2 and "already holds a run" in err and f"--resume {out}" in err


# ---------------------------------------------------------------- options and configs


def test_unknown_yaml_key_names_key_and_file(tmp_path, capsys):
    config = tmp_path / "recipe.yaml"
    config.write_text("epochs: 2\nwarmup: 3\n")
    code, out, err = cli(capsys, "train", "--config", config, "--out", tmp_path / "run")
    assert code == 2 and out == ""
    assert "unknown option 'warmup'" in err and str(config) in err and "warmup_epochs" in err


def test_bad_option_values(tmp_path, capsys):
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run"), "--data", TINY_SYNTH, "--optimizer", "rmsprop")
    assert code == 2 and "'rmsprop'" in err
    code, _, err = cli(capsys, *_tiny_train_args(tmp_path / "run"), "--data", TINY_SYNTH, "--augment", "rotate")
    assert code == 2 and "'rotate'" in err
    code, _, err = cli(capsys, "train", "--model-arg", "widths", "--out", tmp_path / "run")
    assert code == 2 and "KEY=VALUE" in err and "'widths'" in err
    with pytest.raises(SystemExit) as info:  # argparse: not a number
        cli(capsys, "train", "--epochs", "many")
    assert info.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_eval_argument_errors(tmp_path, capsys, digits_run):
    weights = tmp_path / "w.pth"
    code, _, err = cli(capsys, "eval", digits_run["run_dir"], "--weights", weights)
    assert code == 2 and "not both" in err
    code, _, err = cli(capsys, "eval")
    assert code == 2 and "--model NAME and --weights FILE" in err
    code, _, err = cli(capsys, "eval", "--model", "resnet20", "--weights", weights)
    assert code == 2 and "need --data" in err
    code, _, err = cli(capsys, "eval", digits_run["run_dir"], "--split", "val")
    assert code == 2 and "no 'val' split" in err
    code, _, err = cli(capsys, "eval", tmp_path / "none.safetensors")
    assert code == 2 and f"checkpoint not found: {tmp_path / 'none.safetensors'}" in err


def test_eval_mean_without_std(tmp_path, capsys):
    path = tmp_path / "w.pth"
    from convforge import create_model

    # foreign smallcnn weights use the registry's input size: 1 channel (the RGB data is converted)
    torch.save(create_model("smallcnn", num_classes=3, in_chans=1).state_dict(), path)
    code, _, err = cli(capsys, "eval", "--model", "smallcnn", "--weights", path, "--data", TINY_SYNTH,
                       "--mean", "0.5", "0.5", "0.5")
    assert code == 2 and "both --mean and --std" in err
    code, _, err = cli(capsys, "eval", "--model", "smallcnn", "--weights", path, "--data", TINY_SYNTH,
                       "--mean", "0.5", "0.5", "--std", "0.2", "0.2")
    assert code == 2 and "needs 1 mean and std values" in err
    code, out, err = cli(capsys, "eval", "--model", "smallcnn", "--weights", path, "--data", TINY_SYNTH,
                         "--mean", "0.5", "--std", "0.2", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["mean"] == [0.5] and report["std"] == [0.2] and report["images"] == 32
    assert any("converted 3-channel images to the model's 1 channels" in n for n in report["notes"])


def test_eval_weights_for_other_class_count(tmp_path, capsys):
    from convforge import create_model

    path = tmp_path / "w.pth"
    torch.save(create_model("smallcnn", num_classes=10, in_chans=1).state_dict(), path)
    code, _, err = cli(capsys, "eval", "--model", "smallcnn", "--weights", path, "--data", TINY_SYNTH)
    assert code == 2 and "wrong shape: fc.weight (file (10, 128), model (3, 128))" in err and "--num-classes" in err
    # with the right --num-classes the file loads; labels of the 3-class data are a subset of its 10 classes
    code, out, err = cli(capsys, "eval", "--model", "smallcnn", "--weights", path, "--data", TINY_SYNTH,
                         "--num-classes", "10", "--json")
    assert code == 2 and "are not the model's" in err


def test_checkpoint_on_data_with_other_classes(tmp_path, capsys, digits_run):
    root = tmp_path / "pets"
    make_image_folder(root, {"test": 1}, classes=("cat", "dog"))
    code, _, err = cli(capsys, "eval", digits_run["run_dir"], "--data", f"imagefolder:{root}")
    assert code == 2 and "are not the model's" in err


# ---------------------------------------------------------------- untrusted pickles


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".th"])
def test_malicious_weight_file_is_refused(tmp_path, suffix):
    marker = tmp_path / "PWNED"
    path = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": Evil(marker)}, path)
    assert not marker.exists()
    result = run_cli("eval", "--model", "resnet20", "--weights", path, "--data", "synthetic:size=32",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert f"refused to load {path}" in result.stderr and "weights_only=True" in result.stderr
    assert not marker.exists(), "the pickle's code ran"


def test_malicious_plain_pickle_is_refused_in_process(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump(Evil(marker), handle, protocol=2)
    code, _, err = cli(capsys, "eval", "--model", "smallcnn", "--weights", path, "--data", TINY_SYNTH)
    assert code == 2 and "refused to load" in err
    assert not marker.exists()


def test_malicious_cifar_batch_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    write_cifar10_batches(tmp_path / "cifar", per_batch=2, test=2)
    with open(tmp_path / "cifar" / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": Evil(marker), b"labels": [0]}, handle, protocol=2)
    with pytest.raises(DataError) as info:
        load(f"cifar10:{tmp_path / 'cifar'}")
    assert "refused to read" in str(info.value) and "data_batch_3" in str(info.value)
    assert "posix.system" in str(info.value) or "os.system" in str(info.value)
    assert not marker.exists()
