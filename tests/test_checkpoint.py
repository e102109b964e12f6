"""Checkpoints: self-describing safetensors + JSON sidecar, round trip, atomic writes, foreign weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convforge
import convforge.fileio as fileio
from convforge import load_checkpoint
from convforge.data import load
from convforge.errors import CheckpointError
from convforge.train import read_checkpoint_meta, save_checkpoint
from convforge.train.checkpoint import validate_meta
from convforge.train.inference import load_model, predict
from convforge.models import load_foreign_weights
from helpers import save_image


def test_load_checkpoint_rebuilds_the_trained_model(digits_run):
    run_dir = digits_run["run_dir"]
    trained = digits_run["model"]
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert not ckpt.model.training
    assert type(ckpt.model) is type(trained)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(ckpt.model(x), trained(x))
    for key, value in trained.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[key], value)


def test_checkpoint_accuracy_matches_recorded_metrics(digits_run):
    ckpt = load_checkpoint(digits_run["run_dir"] / "last.json")
    data = load("digits")
    result = convforge.evaluate(ckpt.model, data.test, ckpt.mean, ckpt.std, num_classes=10)
    assert result["top1"] == pytest.approx(ckpt.meta["metrics"]["test_top1"])
    assert result["images"] == 360
    assert sum(map(sum, result["confusion"])) == 360
    assert result["top1"] == pytest.approx(digits_run["summary"]["test_top1"])


def test_checkpoint_meta(digits_run):
    run_dir = digits_run["run_dir"]
    meta = read_checkpoint_meta(run_dir / "last.safetensors")
    for key in ("model", "classes", "input_size", "normalization", "recipe", "metrics", "convforge_version"):
        assert key in meta, key
    assert meta["model"] == {"name": "smallcnn", "args": {"widths": [16, 32, 64]}, "num_classes": 10, "in_chans": 1}
    assert meta["classes"] == [str(d) for d in range(10)]
    assert meta["input_size"] == [1, 8, 8]
    data = load("digits")
    assert meta["normalization"] == {"mean": list(data.mean), "std": list(data.std)}
    assert meta["convforge_version"] == convforge.__version__
    assert meta["epoch"] == 3 and meta["weights"] == "trained"
    assert meta["recipe"]["epochs"] == 3 and "out" not in meta["recipe"]
    assert meta["data"] == {"spec": "digits", "train": 1437, "test": 360}
    assert set(meta["metrics"]) >= {"train_loss", "train_top1", "test_top1", "test_top5", "test_loss"}


@pytest.mark.parametrize("name", ["best", "last"])
def test_sidecar_equals_header(digits_run, name):
    path = digits_run["run_dir"] / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["convforge"])
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar == header == read_checkpoint_meta(path)


def test_load_by_dir_json_and_safetensors_paths(digits_run):
    run_dir = digits_run["run_dir"]
    by_dir = load_checkpoint(run_dir)
    assert by_dir.path == run_dir / "best.safetensors"
    by_json = load_checkpoint(run_dir / "last.json")
    by_file = load_checkpoint(run_dir / "last.safetensors")
    assert by_json.path == by_file.path == run_dir / "last.safetensors"
    assert by_json.meta == by_file.meta
    for key, value in by_file.model.state_dict().items():
        assert torch.equal(by_json.model.state_dict()[key], value)
    assert by_file.classes == [str(d) for d in range(10)] and by_file.input_size == (1, 8, 8)
    assert len(by_file.mean) == len(by_file.std) == 1


def test_predict_images_matches_model(digits_run, tmp_path):
    ckpt = load_model(digits_run["run_dir"])
    data = load("digits")
    paths = [save_image(tmp_path / f"d{i}.png", data.test.images[i, 0].numpy()) for i in range(5)]
    predictions = predict(ckpt, paths, top_k=3)
    x = convforge.data.normalize(data.test.images[:5], ckpt.mean, ckpt.std)
    with torch.no_grad():
        probs = ckpt.model(x).softmax(1)
    for i, item in enumerate(predictions):
        assert item["image"] == str(paths[i])
        assert len(item["top"]) == 3
        assert item["top"][0]["index"] == int(probs[i].argmax())
        assert item["top"][0]["class"] == ckpt.classes[item["top"][0]["index"]]
        assert item["top"][0]["probability"] == pytest.approx(float(probs[i].max()), abs=1e-6)
        values = [t["probability"] for t in item["top"]]
        assert values == sorted(values, reverse=True) and sum(values) <= 1 + 1e-6
    everything = predict(ckpt, paths[:1], top_k=50)
    assert len(everything[0]["top"]) == 10
    assert sum(t["probability"] for t in everything[0]["top"]) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- writing


def _meta(num_classes=3):
    return {"model": {"name": "smallcnn", "args": {"widths": [4, 8]}, "num_classes": num_classes, "in_chans": 1},
            "classes": [f"c{i}" for i in range(num_classes)], "input_size": [1, 8, 8],
            "normalization": {"mean": [0.5], "std": [0.25]}}


def _model(seed):
    torch.manual_seed(seed)
    return convforge.create_model("smallcnn", num_classes=3, in_chans=1, widths=[4, 8])


def test_save_and_load_round_trip(tmp_path):
    model = _model(0)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", model, _meta())
    assert path == tmp_path / "ckpt.safetensors" and path.with_suffix(".json").is_file()
    loaded = load_checkpoint(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    assert loaded.meta["format"] == "convforge-checkpoint"


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.safetensors", _model(0), _meta())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = fileio.atomic_write

    def half_then_fail(target, write):
        def broken(tmp):
            write(tmp)
            size = os.path.getsize(tmp)
            with open(tmp, "r+b") as handle:
                handle.truncate(size // 2)
            raise OSError("No space left on device")

        return real(target, broken)

    monkeypatch.setattr(fileio, "atomic_write", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, _model(1), _meta())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    for key, value in _model(0).state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_failed_serialisation_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from convforge.train import checkpoint

    path = save_checkpoint(tmp_path / "best.safetensors", _model(0), _meta())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail(*args, **kwargs):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(checkpoint, "st_save", fail)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, _model(1), _meta())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    fileio.atomic_write_json(target, {"v": 1})

    def fail(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(fileio.os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        fileio.atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_interrupted_training_write_keeps_last_checkpoint(tmp_path, monkeypatch):
    """Killed halfway through writing epoch 2's last.safetensors: epoch 1's file stays whole and loadable."""
    from convforge import TrainConfig, fit
    from convforge.train import TrainingInterrupted

    real = fileio.atomic_write
    writes = {"last.safetensors": 0}

    def interrupt_second_last_write(target, write):
        name = os.path.basename(target)
        if name in writes:
            writes[name] += 1
            if writes[name] == 2:
                def half(tmp):
                    write(tmp)
                    with open(tmp, "r+b") as handle:
                        handle.truncate(os.path.getsize(tmp) // 2)
                    raise KeyboardInterrupt

                return real(target, half)
        return real(target, write)

    monkeypatch.setattr(fileio, "atomic_write", interrupt_second_last_write)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        fit(TrainConfig(data="synthetic:classes=3,size=8,train=64,test=32", epochs=2, batch_size=16,
                          model_args={"widths": [4, 8]}, out=str(run)), quiet=True)
    assert writes["last.safetensors"] == 2
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.meta["epoch"] == 1
    assert json.loads((run / "last.json").read_text())["epoch"] == 1
    assert _leftovers(run) == []


# ---------------------------------------------------------------- bad checkpoints


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="without best.safetensors"):
        load_checkpoint(tmp_path)
    pth = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1)}, pth)
    with pytest.raises(CheckpointError, match="--weights"):
        load_checkpoint(pth)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(CheckpointError, match="no convforge metadata"):
        load_checkpoint(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(garbage)


@pytest.mark.parametrize("change,match", [
    (lambda m: m.pop("format"), "not a convforge checkpoint"),
    (lambda m: m.update(format_version=99), "version 99"),
    (lambda m: m["model"].pop("name"), "model.name"),
    (lambda m: m["model"].update(num_classes="3"), "model.num_classes"),
    (lambda m: m.update(classes=["a"]), "classes"),
    (lambda m: m["normalization"].update(std=[0.0]), "normalization"),
    (lambda m: m.update(input_size=[1, 8]), "input_size"),
])
def test_validate_meta_names_the_field(change, match):
    meta = {"format": "convforge-checkpoint", "format_version": 1, **_meta()}
    validate_meta(meta, "x")
    change(meta)
    with pytest.raises(CheckpointError, match=match):
        validate_meta(meta, "x")


def test_weights_that_do_not_fit_are_named(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _model(0), _meta())
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "missing: fc.bias" in message and "unexpected: extra.weight" in message


# ---------------------------------------------------------------- foreign weights


def test_foreign_pth_with_module_prefix(tmp_path):
    source = _model(3)
    path = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}, "best_prec1": 1.0}, path)
    target = load_foreign_weights(_model(4), path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_foreign_safetensors_and_missing_bn_counter(tmp_path):
    source = _model(5)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    target = load_foreign_weights(_model(6), path)
    assert torch.equal(target.fc.weight, source.fc.weight)


def test_foreign_wrong_shape(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(convforge.create_model("smallcnn", num_classes=5, in_chans=1, widths=[4, 8]).state_dict(), path)
    with pytest.raises(CheckpointError, match="wrong shape: fc.weight"):
        load_foreign_weights(_model(0), path)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        load_foreign_weights(_model(0), empty)
    with pytest.raises(CheckpointError, match="weight file not found"):
        load_foreign_weights(_model(0), tmp_path / "missing.pth")


def test_atomic_writes_get_ordinary_permissions_not_the_private_temp_mode(tmp_path):
    """mkstemp makes 0600 files: outputs (masks, checkpoints, reports) must get what open() would give."""
    old = os.umask(0o022)
    try:
        fresh = fileio.atomic_write_bytes(tmp_path / "fresh.bin", b"x")
        assert fresh.stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        assert fileio.atomic_write_bytes(tmp_path / "group.bin", b"x").stat().st_mode & 0o777 == 0o640
        kept = tmp_path / "kept.bin"
        kept.write_bytes(b"old")
        kept.chmod(0o600)
        fileio.atomic_write_bytes(kept, b"new")
        assert kept.stat().st_mode & 0o777 == 0o600 and kept.read_bytes() == b"new"
    finally:
        os.umask(old)


def test_cache_entries_are_not_private_folders(tmp_path):
    import numpy as np

    from convforge.data.cache import open_split, write_entry

    old = os.umask(0o022)
    try:
        entry = tmp_path / "imagefolder" / "x-123"
        write_entry(entry, {"train": (np.zeros((2, 1, 3, 3), np.uint8), np.arange(2))}, {"splits": ["train"]})
    finally:
        os.umask(old)
    assert entry.stat().st_mode & 0o777 == 0o755
    assert open_split(entry, "train").labels.tolist() == [0, 1]
