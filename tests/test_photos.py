"""Image-store data (``imagefolder:DIR`` with ``--store-size``) in training, resume, evaluation and prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from convforge import TrainConfig, fit
from convforge.cli import main
from convforge.data import load, normalize
from convforge.data.photos import decode_photo
from convforge.data.views import resize_center_crop
from convforge.errors import ConfigError, DataError
from convforge.train import TrainingInterrupted
from convforge.train.checkpoint import load_checkpoint
from convforge.train.inference import as_loaded, evaluate, predict

from helpers import colour_photos

SIZES = [(24, 40), (40, 24), (32, 32)]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_photos(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Three classes told apart by their mean colour, images of varied aspect ratios."""
    return colour_photos(root, per_class, SIZES, noise=40, seed=seed)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("photos") / "photos", {"train": 8, "test": 3})


def _config(photos: Path, out: Path, **extra) -> TrainConfig:
    values = dict(model="smallcnn", data=f"imagefolder:{photos}", store_size=24, image_size=16, epochs=2,
                  batch_size=8, threads=1, seed=3, model_args={"widths": [8, 16, 32]}, out=str(out))
    values.update(extra)
    return TrainConfig(**values)


def test_load_gives_stores_and_crop_size(photos):
    data = load(f"imagefolder:{photos}", image_size=16, store_size=24)
    assert data.is_store and data.classes == ["blue", "green", "red"] and data.num_classes == 3
    assert data.image_size == (16, 16) and data.channels == 3 and data.val is None
    assert len(data.train) == 24 and len(data.test) == 9
    assert sorted({tuple(s) for s in data.train.sizes.tolist()}) == [(24, 24), (24, 40), (40, 24)]
    assert len(data.mean) == 3 and all(s > 0 for s in data.std)
    assert data.preprocess() == {"resize": [18, 18], "crop": [16, 16], "crop_pct": 0.875,
                                 "interpolation": "bilinear-antialias", "store_size": 24, "train_size": [16, 16]}
    default = load(f"imagefolder:{photos}", store_size=24)
    assert default.image_size == (128, 128) and any("128x128" in n for n in default.notes)


def test_train_evaluate_and_predict(tmp_path, photos, capsys):
    run = tmp_path / "run"
    summary = fit(_config(photos, run), quiet=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "train_top1", "test_top1", "test_top5", "test_loss"):
        assert np.isfinite(records[-1][key])
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.meta["preprocess"]["crop"] == [16, 16] and ckpt.meta["preprocess"]["store_size"] == 24
    assert ckpt.meta["input_size"] == [3, 16, 16]
    loaded = as_loaded(ckpt)
    result = evaluate(loaded)
    assert result["top1"] == records[-1]["test_top1"] and result["images"] == 9
    assert result["loss"] == pytest.approx(records[-1]["test_loss"], rel=1e-6)
    assert summary["test_top1"] == records[-1]["test_top1"]

    assert main(["eval", str(run), "--json"]) == 0  # best.safetensors: the best epoch's test top-1
    best = json.loads(capsys.readouterr().out)
    assert best["top1"] == max(r["test_top1"] for r in records)

    path = photos / "test" / "red" / "1.png"  # 40x24
    got = predict(loaded, [path], top_k=3)[0]["top"]
    view = resize_center_crop(decode_photo(path, 3), (16, 16), 0.875)
    with torch.no_grad():
        probs = loaded.model.eval()(normalize(view[None], loaded.mean, loaded.std)).softmax(1)[0]
    assert [t["index"] for t in got] == probs.argsort(descending=True).tolist()
    assert [t["probability"] for t in got] == pytest.approx(probs.sort(descending=True).values.tolist(), abs=1e-6)


def test_bicubic_evaluation_is_recorded_and_reproduced(tmp_path, photos):
    run = tmp_path / "run"
    summary = fit(_config(photos, run, epochs=1, interpolation="bicubic"), quiet=True)
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.meta["preprocess"]["interpolation"] == "bicubic-antialias"
    loaded = as_loaded(ckpt)
    assert evaluate(loaded)["top1"] == summary["test_top1"]
    path = photos / "test" / "red" / "1.png"
    bicubic = resize_center_crop(decode_photo(path, 3), (16, 16), 0.875, "bicubic")
    assert not torch.equal(bicubic, resize_center_crop(decode_photo(path, 3), (16, 16), 0.875))
    with torch.no_grad():
        probs = loaded.model.eval()(normalize(bicubic[None], loaded.mean, loaded.std)).softmax(1)[0]
    got = predict(loaded, [path], top_k=3)[0]["top"]
    assert [t["probability"] for t in got] == pytest.approx(probs.sort(descending=True).values.tolist(), abs=1e-6)
    with pytest.raises(ConfigError, match="interpolation must be one of bilinear, bicubic, got 'lanczos'"):
        fit(_config(photos, tmp_path / "bad", interpolation="lanczos"), quiet=True)
    with pytest.raises(ConfigError, match="interpolation: only for image-store data"):
        fit(_config(photos, tmp_path / "fixed", interpolation="bicubic", store_size=None), quiet=True)


@pytest.mark.parametrize("augment", ["rrc-flip-ta", "center"])
def test_other_store_augments_train(tmp_path, photos, augment):
    summary = fit(_config(photos, tmp_path / "run", epochs=1, augment=augment, rrc_scale=[0.25, 1.0],
                          crop_pct=1.0), quiet=True)
    assert np.isfinite(summary["test_top1"])
    assert load_checkpoint(tmp_path / "run" / "last.safetensors").meta["preprocess"]["crop_pct"] == 1.0


def test_resume_is_bitwise_equal(tmp_path, photos):
    reference = tmp_path / "reference"
    fit(_config(photos, reference), quiet=True)
    run = tmp_path / "run"

    def stop_after_one(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        fit(_config(photos, run), on_epoch_end=stop_after_one, quiet=True)
    fit(TrainConfig(resume=str(run)), quiet=True)
    got, want = load_file(str(run / "last.safetensors")), load_file(str(reference / "last.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_speednet_data_init_works_on_stores(tmp_path, photos):
    summary = fit(_config(photos, tmp_path / "run", model="speednet", model_args={}, epochs=1), quiet=True)
    assert np.isfinite(summary["test_top1"])


@pytest.mark.parametrize("options, message", [
    ({"data": "digits"}, "--store-size needs --data imagefolder"),
    ({"augment": "crop-flip"}, "for fixed-size data"),
    ({"augment": "bogus"}, "unknown augment"),
    ({"store_size": 0}, "store_size must be in"),
    ({"crop_pct": 1.5}, "crop_pct must be in (0, 1]"),
    ({"rrc_scale": [0.5, 0.1]}, "rrc_scale must be LOW HIGH"),
    ({"rrc_scale": [0.5]}, "rrc_scale must be LOW HIGH"),
    ({"store_size": None, "crop_pct": 0.9}, "add --store-size"),
    ({"store_size": None, "augment": "rrc-flip"}, "is for image-store data"),
    ({"task": "segment", "model": "fcn8s"}, "classification only"),
])
def test_bad_option_combinations(tmp_path, photos, options, message):
    with pytest.raises(ConfigError, match=None) as info:
        _config(photos, tmp_path / "run", **options).validate()
    assert message in str(info.value)


def test_cli_options(tmp_path, photos):
    from convforge.cli import build_parser
    from convforge.cli.train import train_config

    args = build_parser().parse_args(["train", "--data", f"imagefolder:{photos}", "--store-size", "24",
                                      "--crop-pct", "0.9", "--rrc-scale", "0.2", "1", "--augment", "rrc-flip-ta"])
    cfg = train_config(args)
    cfg.validate()
    assert (cfg.store_size, cfg.crop_pct, cfg.rrc_scale, cfg.augment) == (24, 0.9, [0.2, 1.0], "rrc-flip-ta")


def test_store_size_is_for_image_folders_only():
    with pytest.raises(DataError, match="imagefolder"):
        load("digits", store_size=24)


def test_decode_photo_applies_exif_orientation_and_store_size(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90 degrees
    Image.new("RGB", (40, 24), (200, 40, 40)).save(path, exif=exif)
    assert tuple(decode_photo(path, 3).shape) == (3, 40, 24)
    assert tuple(decode_photo(path, 3, store_size=12).shape) == (3, 20, 12)
    with pytest.raises(DataError, match="cannot read image"):
        decode_photo(tmp_path / "missing.jpg", 3)


def test_store_decoding_helpers_are_public_and_match_decode_photo(tmp_path):
    from convforge.data.store import decode_problem, decode_upright, image_warnings, stored_size

    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 24), (200, 40, 40)).save(path, exif=exif)
    with image_warnings(), Image.open(path) as img:
        assert stored_size(img, None) == (40, 24) and stored_size(img, 12) == (20, 12)
    array = decode_upright(str(path), (20, 12), 3, 12)
    assert array.shape == (20, 12, 3)
    assert torch.equal(decode_photo(path, 3, store_size=12), torch.from_numpy(array.copy()).permute(2, 0, 1))
    assert decode_problem(str(tmp_path / "missing.jpg"), FileNotFoundError(2, "no such file")) == "file not found"


def test_report_of_a_store_run_evaluates_its_evaluation_views(tmp_path, photos):
    from convforge.report import write_report
    from convforge.report.collect import collect_run

    run = tmp_path / "run"
    fit(_config(photos, run, epochs=1), quiet=True)
    out = write_report([run], tmp_path / "report.html")
    assert out.is_file()
    evaluation = collect_run(run).evaluation
    assert evaluation is not None, collect_run(run).notes
    want = evaluate(as_loaded(load_checkpoint(run / "best.safetensors")))
    assert evaluation["top1"] == want["top1"] and evaluation["images"] == want["images"] == 9
    assert evaluation["confusion"] == want["confusion"] and evaluation["per_class"] == want["per_class"]
    assert evaluation["wrong_total"] == 9 - sum(evaluation["confusion"][i][i] for i in range(3))
    assert len(evaluation["wrong"]) == min(evaluation["wrong_total"], 16)
    confidences = [w["confidence"] for w in evaluation["wrong"]]
    assert confidences == sorted(confidences, reverse=True)


def test_export_and_quantize_of_a_store_checkpoint_use_its_evaluation_views(tmp_path, photos, capsys):
    from convforge.cli.deploy import _calibration_images
    from convforge.data.views import resize_center_crop_batch
    from convforge.train.inference import load_model

    run = tmp_path / "run"
    fit(_config(photos, run, epochs=1), quiet=True)
    ckpt = run / "best.safetensors"
    loaded = load_model(ckpt)
    preprocess = loaded.meta["preprocess"]

    onnx = tmp_path / "model.onnx"
    assert main(["export", str(ckpt), "--out", str(onnx), "--json"]) == 0
    capsys.readouterr()
    assert json.loads(onnx.with_name(onnx.name + ".json").read_text())["preprocess"] == preprocess

    x, data = _calibration_images(f"imagefolder:{photos}", loaded, 5, (3, 16, 16))
    assert data.is_store and x.shape == (5, 3, 16, 16)
    pick = torch.randperm(24, generator=torch.Generator().manual_seed(0))[:5]
    views = resize_center_crop_batch([data.train.image(int(i)) for i in pick], (16, 16), preprocess["crop_pct"])
    assert torch.equal(x, normalize(views, loaded.mean, loaded.std))

    out = tmp_path / "model-int8.onnx"
    assert main(["quantize", str(ckpt), "--calib-data", f"imagefolder:{photos}", "--calib-samples", "8",
                 "--threads", "1", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration_images"] == 8 and report["eval"]["images"] == 9
    assert report["top1_torch"] == evaluate(loaded)["top1"]  # the same views as convforge eval
    assert json.loads(out.with_name(out.name + ".json").read_text())["preprocess"] == preprocess
