"""Registry pretrained configs, and fine-tuning from a torchvision-layout weight file with them (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import convforge
from convforge import TrainConfig, fit
from convforge.cli import main
from convforge.data.views import eval_resize_size
from convforge.models import list_models, model_info, pretrained_cfg
from convforge.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, pretrained_names
from convforge.train import TrainingInterrupted
from convforge.train.checkpoint import load_checkpoint
from convforge.train.init import _preprocess_note, pretrained_defaults

SIZES = [(48, 64), (64, 40), (56, 56), (40, 72)]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_photos(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Three classes of varied-size photos: a noisy background with a class-coloured ellipse or box."""
    rng = np.random.default_rng(seed)
    colours = {"ant": (220, 60, 40), "bee": (40, 200, 60), "cat": (50, 70, 220)}
    for split, count in per_class.items():
        for c, (name, colour) in enumerate(colours.items()):
            for i in range(count):
                h, w = SIZES[(i + c) % len(SIZES)]
                background = rng.integers(60, 160, size=(h, w, 3), dtype=np.uint8)
                image = Image.fromarray(background, "RGB")
                box = sorted(rng.integers(0, w, 2).tolist()), sorted(rng.integers(0, h, 2).tolist())
                shape = [box[0][0], box[1][0], box[0][1] + 8, box[1][1] + 8]
                draw = ImageDraw.Draw(image)
                (draw.ellipse if c % 2 else draw.rectangle)(shape, fill=colour)
                path = root / split / name / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path, quality=90)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("photos") / "photos", {"train": 6, "test": 3})


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory) -> Path:
    """A plain ``.pth`` state dict in torchvision's ResNet-18 layout (1000-class head), as torchvision saves."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18-imagenet.pth"
    torch.save(convforge.create_model("resnet18", num_classes=1000).state_dict(), path)
    return path


def _config(photos: Path, weights: Path, out: Path, **extra) -> TrainConfig:
    values = dict(model="resnet18", init=str(weights), data=f"imagefolder:{photos}", store_size=40, image_size=32,
                  epochs=1, batch_size=6, threads=1, seed=0, out=str(out))
    values.update(extra)
    return TrainConfig(**values)


def test_every_imagenet_entry_has_a_pretrained_cfg():
    """ImageNet entries are the registry's 1000-class models; each has a cfg, and nothing else has one."""
    imagenet = [n for n in list_models() if model_info(n).num_classes == 1000]
    assert len(imagenet) >= 45 and set(pretrained_names()) == set(imagenet)
    for name in list_models():
        info, cfg = model_info(name), pretrained_cfg(name)
        assert info.pretrained_cfg == cfg and info.as_dict()["pretrained_cfg"] == (cfg.as_dict() if cfg else None)
        if cfg is None:
            continue
        assert cfg.input_size == info.input_size, name  # the registry's size is the weights' crop
        assert tuple(eval_resize_size((cfg.image_size,) * 2, cfg.crop_pct)) == (cfg.resize, cfg.resize), name
        assert cfg.interpolation in ("bilinear", "bicubic") and len(cfg.mean) == len(cfg.std) == 3
    for name in ("cifar_resnet20", "resnet20", "wrn28_10", "fcn8s_resnet18", "unet", "srcnn_915", "espcn"):
        assert name not in list_models() or pretrained_cfg(name) is None
    resnet50, inception, b1 = pretrained_cfg("resnet50"), pretrained_cfg("inception_v3"), pretrained_cfg("efficientnet_b1")
    assert (resnet50.resize, resnet50.image_size, resnet50.crop_pct, resnet50.interpolation) == (256, 224, 0.875, "bilinear")
    assert resnet50.weights == "torchvision:ResNet50_Weights.IMAGENET1K_V1"
    assert (resnet50.mean, resnet50.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (inception.resize, inception.image_size) == (342, 299)
    assert (b1.resize, b1.image_size, b1.interpolation) == (256, 240, "bicubic")


def test_models_json_shows_the_cfg(capsys):
    assert main(["models", "inception_v3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["models"][0]
    assert row["pretrained_cfg"]["resize"] == 342 and row["pretrained_cfg"]["input_size"] == [3, 299, 299]


def test_defaults_fill_only_what_the_user_left_unset(tmp_path, torchvision_file):
    base = dict(model="resnet50", init=str(torchvision_file), data=f"imagefolder:{tmp_path}", store_size=300)
    filled, applied = pretrained_defaults(TrainConfig(**base))
    assert (filled.image_size, filled.crop_pct) == (224, 0.875) and applied.kept == applied.warnings == []
    assert applied.taken == ["image size 224", "crop_pct 0.875 (resize 256, crop 224)", "bilinear resizing"]
    own, applied = pretrained_defaults(TrainConfig(**base, image_size=64, crop_pct=0.9, interpolation="bicubic"))
    assert (own.image_size, own.crop_pct, own.interpolation) == (64, 0.9, "bicubic") and applied.taken == []
    assert applied.kept == ["--image-size 64", "--crop-pct 0.9", "--interpolation bicubic"]
    efficientnet, applied = pretrained_defaults(TrainConfig(**{**base, "model": "efficientnet_b0"}))
    assert efficientnet.interpolation == "bicubic" and "bicubic resizing" in applied.taken
    _, applied = pretrained_defaults(TrainConfig(**base, image_size=[192, 256], eval_image_size=[224, 288]))
    assert applied.warnings == []  # non-square sizes: the evaluation resize (256 x 329) is the one checked
    _, applied = pretrained_defaults(TrainConfig(**base, image_size=[192, 256], eval_image_size=[288, 320]))
    assert applied.warnings == ["--store-size 300 is below the 329 px evaluation resize: images are upscaled"]
    half, _ = pretrained_defaults(TrainConfig(**base, crop_pct=0.95))
    assert (half.image_size, half.crop_pct) == (224, 0.95)
    _, applied = pretrained_defaults(TrainConfig(**{**base, "store_size": 160}))
    assert applied.warnings == ["--store-size 160 is below the 256 px evaluation resize: images are upscaled"]
    fixed, applied = pretrained_defaults(TrainConfig(**{**base, "store_size": None}))  # no store: mean/std only
    assert (fixed.image_size, fixed.crop_pct, applied.store) == (None, None, False)
    for other in (dict(model="resnet20"), dict(init=None)):  # a CIFAR model has no cfg; no --init: nothing
        same, applied = pretrained_defaults(TrainConfig(**{**base, **other}))
        assert applied is None and same.crop_pct is None


def test_data_of_other_channels_keeps_its_statistics(torchvision_file):
    _, applied = pretrained_defaults(TrainConfig(model="resnet18", init=str(torchvision_file), data="digits"))
    gray = SimpleNamespace(channels=1, mean=(0.3,), std=(0.2,))
    mean, std, line, record = _preprocess_note(applied, gray)
    assert (mean, std, record) == ((0.3,), (0.2,), None) and "take 3 channels" in line
    mean, std, line, record = _preprocess_note(applied, SimpleNamespace(channels=3, mean=(0.5,) * 3, std=(0.1,) * 3))
    assert (mean, std) == (IMAGENET_MEAN, IMAGENET_STD) and "add --store-size N" in line
    assert record["taken"] == ["mean/std"]


def test_fine_tune_takes_the_registry_preprocessing_and_eval_reproduces_it(tmp_path, photos, torchvision_file,
                                                                           capsys):
    run = tmp_path / "run"
    fit(_config(photos, torchvision_file, run))  # --image-size 32 given: crop_pct and mean/std from the registry
    out = capsys.readouterr().err  # the run's notes go to stderr
    line = next(t for t in out.splitlines() if "preprocessing from the registry" in t)
    assert "ResNet18_Weights.IMAGENET1K_V1" in line and "crop_pct 0.875" in line and "--image-size 32" in line
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.meta["normalization"] == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert ckpt.meta["preprocess"]["crop_pct"] == 0.875 and ckpt.meta["preprocess"]["crop"] == [32, 32]
    assert ckpt.meta["preprocess"]["resize"] == [36, 36] and ckpt.meta["input_size"] == [3, 32, 32]
    assert ckpt.meta["init"]["foreign"] and ckpt.meta["init"]["head"] == "reinitialised"
    assert ckpt.meta["init"]["pretrained_cfg"]["weights"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    final = [json.loads(t) for t in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert main(["eval", str(run / "last.safetensors"), "--json"]) == 0  # nothing restated
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == final["test_top1"] and result["images"] == 9


def test_explicit_crop_pct_wins(tmp_path, photos, torchvision_file):
    run = tmp_path / "run"
    fit(_config(photos, torchvision_file, run, crop_pct=0.8), quiet=True)
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.meta["preprocess"]["crop_pct"] == 0.8 and ckpt.meta["preprocess"]["resize"] == [40, 40]
    assert ckpt.meta["normalization"]["mean"] == list(IMAGENET_MEAN)
    assert ckpt.meta["init"]["pretrained_cfg"]["taken"] == ["mean/std", "bilinear resizing"]


def test_fixed_size_folder_takes_the_mean_and_std(tmp_path, photos, torchvision_file):
    run = tmp_path / "run"
    fit(_config(photos, torchvision_file, run, store_size=None), quiet=True)
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.meta["normalization"] == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert "preprocess" not in ckpt.meta


def test_resume_keeps_the_registry_preprocessing(tmp_path, photos, torchvision_file):
    run = tmp_path / "run"

    def stop_after_one(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        fit(_config(photos, torchvision_file, run, epochs=2), on_epoch_end=stop_after_one, quiet=True)
    assert "crop_pct: 0.875" in (run / "config.yaml").read_text()  # recorded as the run's own option
    fit(TrainConfig(resume=str(run)), quiet=True)
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.meta["epoch"] == 2 and ckpt.meta["preprocess"]["crop_pct"] == 0.875
    assert ckpt.meta["normalization"] == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
