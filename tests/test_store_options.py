"""Image-store training options: non-square sizes, FixRes evaluation size, RandomResizedCrop ratio,
RandAugment, progressive resizing, pinned memory, and their configuration errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convforge import TrainConfig, fit
from convforge.cli import build_parser, main
from convforge.cli.train import train_config
from convforge.config import resolve_store_size
from convforge.data import load, normalize
from convforge.data.photos import decode_photo
from convforge.data.randaugment import (
    RANDAUGMENT_OPS,
    apply_randaugment,
    randaugment,
    randaugment_magnitudes,
    randaugment_params,
)
from convforge.data.store_loader import StoreLoader, progressive_size
from convforge.data.views import apply_op, random_resized_crop_params, resize_center_crop
from convforge.errors import ConfigError
from convforge.train import TrainingInterrupted
from convforge.train.checkpoint import load_checkpoint
from convforge.train.inference import as_loaded, evaluate, predict
from helpers import assert_ranks_match_single, colour_photos, read_jsonl

SIZES = [(24, 40), (40, 24), (32, 32), (28, 48)]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three colour classes, 24-48 px images of varied aspect ratio: 4 train and 2 test per class."""
    return colour_photos(tmp_path_factory.mktemp("photos") / "photos", {"train": 4, "test": 2}, SIZES, noise=40)


def _config(photos: Path, out: Path, **extra) -> TrainConfig:
    values = dict(model="smallcnn", data=f"imagefolder:{photos}", store_size=32, image_size=16, epochs=1,
                  batch_size=4, threads=1, seed=5, model_args={"widths": [4, 8, 8]}, out=str(out))
    values.update(extra)
    return TrainConfig(**values)


# ---- non-square sizes and FixRes ----------------------------------------------------------------------

def test_non_square_sizes_default_the_evaluation_view_to_the_training_crop(photos):
    data = load(f"imagefolder:{photos}", image_size=(16, 24), store_size=32)
    assert data.image_size == (16, 24) and data.eval_view == ((16, 24), 0.875, "bilinear")
    assert data.preprocess()["crop"] == [16, 24] and data.preprocess()["resize"] == [18, 27]


def test_fixres_non_square_run_is_recorded_and_reproduced_by_eval_and_predict(tmp_path, photos, capsys):
    run = tmp_path / "run"
    fit(_config(photos, run, image_size=[16, 24], eval_image_size=[24, 20], crop_pct=0.8), quiet=True)
    record = read_jsonl(run / "metrics.jsonl")[-1]
    assert record["train_size"] == [16, 24]
    ckpt = load_checkpoint(run / "last.safetensors")
    preprocess = ckpt.meta["preprocess"]
    assert preprocess["crop"] == [24, 20] and preprocess["resize"] == [30, 25] and preprocess["crop_pct"] == 0.8
    assert preprocess["train_size"] == [16, 24]
    assert ckpt.meta["input_size"] == [3, 24, 20]  # what export/quantize feed the model
    assert ckpt.meta["recipe"]["image_size"] == [16, 24] and ckpt.meta["recipe"]["eval_image_size"] == [24, 20]

    loaded = as_loaded(ckpt)
    result = evaluate(loaded)
    assert result["top1"] == record["test_top1"] and result["images"] == 6
    assert result["loss"] == pytest.approx(record["test_loss"], rel=1e-6)
    assert main(["eval", str(run / "last.safetensors"), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["top1"] == record["test_top1"] and cli["loss"] == pytest.approx(record["test_loss"], rel=1e-6)

    path = photos / "test" / "red" / "1.png"  # 40x24
    view = resize_center_crop(decode_photo(path, 3, 32), (24, 20), 0.8)
    assert view.shape == (3, 24, 20)
    with torch.no_grad():
        probs = loaded.model.eval()(normalize(view[None], loaded.mean, loaded.std)).softmax(1)[0]
    got = predict(loaded, [path], top_k=3)[0]["top"]
    assert [t["probability"] for t in got] == pytest.approx(probs.sort(descending=True).values.tolist(), abs=1e-6)


# ---- RandomResizedCrop ratio --------------------------------------------------------------------------

def test_rrc_ratio_bounds_are_respected_and_reach_the_loader(tmp_path, photos):
    sizes = torch.randint(200, 400, (500, 2), generator=torch.Generator().manual_seed(0))
    for low, high in ((0.5, 0.6), (1.5, 2.5), (1.0, 1.0)):
        boxes = random_resized_crop_params(sizes, (0.2, 0.5), (low, high), torch.Generator().manual_seed(1))
        ratio = boxes[:, 3].double() / boxes[:, 2].double()
        slack = 1.0 / boxes[:, 2:].amin(dim=1).double() * 2  # the rounding of w and h to whole pixels
        assert bool(((ratio >= low * (1 - slack)) & (ratio <= high * (1 + slack))).all())
        assert bool(((boxes[:, 0] + boxes[:, 2] <= sizes[:, 0]) & (boxes[:, 1] + boxes[:, 3] <= sizes[:, 1])).all())
    from convforge.train.tasks.classify import store_train_loader

    cfg = _config(photos, tmp_path / "run", rrc_ratio=[0.5, 0.6], augment="rrc-flip")
    cfg.validate()
    data = load(cfg.data, image_size=16, store_size=32)
    loader = store_train_loader(data, cfg, torch.device("cpu"), 0, 1)
    assert loader.ratio == (0.5, 0.6) and loader.scale == (0.08, 1.0)


# ---- RandAugment --------------------------------------------------------------------------------------

def test_randaugment_magnitudes_match_torchvision():
    """torchvision RandAugment._augmentation_space(31, (h, w)) at a few levels."""
    size = (200, 331)
    expected = {"shear_x": 0.3, "translate_x": 150.0, "translate_y": 150 / 331 * 200, "rotate": 30.0,
                "brightness": 0.9, "sharpness": 0.9, "posterize": 4.0, "solarize": 0.0, "equalize": 0.0}
    for op, top in expected.items():
        table = randaugment_magnitudes(op, size)
        assert len(table) == 31 and float(table[30]) == pytest.approx(top, abs=1e-4)
    assert randaugment_magnitudes("rotate", size)[9] == pytest.approx(9.0)
    assert randaugment_magnitudes("posterize", size).tolist()[:9] == [8, 8, 8, 8, 7, 7, 7, 7, 7]
    assert float(randaugment_magnitudes("solarize", size)[0]) == 255.0
    assert len(RANDAUGMENT_OPS) == 14 and RANDAUGMENT_OPS[0] == "identity"


@pytest.mark.parametrize("op", ["identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
                                "brightness", "color", "contrast", "sharpness", "posterize", "solarize"])
def test_randaugment_ops_at_magnitude_zero_are_the_identity(op):
    """Where torchvision's are: every op with a magnitude (solarize at threshold 255 only without 255 pixels)."""
    batch = torch.randint(0, 255, (6, 3, 12, 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    magnitude = randaugment_magnitudes(op, batch.shape[-2:])[0]
    assert torch.equal(apply_op(batch, op, magnitude), batch)
    ops = torch.full((6, 2), RANDAUGMENT_OPS.index(op))
    assert torch.equal(apply_randaugment(batch, ops, magnitude.expand(6, 2)), batch)


def test_randaugment_is_deterministic_and_applies_its_rounds_in_turn():
    batch = torch.randint(0, 256, (30, 3, 10, 14), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    out = randaugment(batch, 2, 9, torch.Generator().manual_seed(7))
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert torch.equal(out, randaugment(batch, 2, 9, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, randaugment(batch, 2, 9, torch.Generator().manual_seed(8)))
    ops, mags = randaugment_params(30, 2, 9, (10, 14), torch.Generator().manual_seed(7))
    assert ops.shape == (30, 2) and len(set(ops.flatten().tolist())) > 5
    for i in range(30):
        one = batch[i:i + 1]
        for k in range(2):
            one = apply_op(one, RANDAUGMENT_OPS[int(ops[i, k])], mags[i, k])
        assert torch.equal(out[i], one[0])
    with pytest.raises(ConfigError, match="magnitude"):
        randaugment(batch, 2, 31)


class _Store:
    def __init__(self, n: int = 10) -> None:
        gen = torch.Generator().manual_seed(0)
        self.sizes = torch.randint(12, 30, (n, 2), generator=gen)
        self._images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in self.sizes.tolist()]
        self.labels, self.channels = torch.arange(n), 3

    def __len__(self) -> int:
        return len(self._images)

    def image(self, i: int) -> torch.Tensor:
        return self._images[i]


def _ra_loader(store, batch_size: int = 4, **kwargs) -> StoreLoader:
    options = dict(train=True, image_size=(8, 12), augment="randaugment", randaugment=(3, 12), seed=4)
    options.update(kwargs)
    return StoreLoader(store, batch_size, (0.5,) * 3, (0.25,) * 3, **options)


def test_randaugment_loader_is_deterministic_per_seed_epoch_and_rank():
    store = _Store()
    first = [x for x, _ in _ra_loader(store).iter_from(0)]
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in _ra_loader(store, prefetch=0).iter_from(0)]))
    plain = [x for x, _ in _ra_loader(store, augment=None).iter_from(0)]
    assert any(not torch.equal(a, b) for a, b in zip(first, plain))
    other = _ra_loader(store)
    other.set_epoch(1)
    assert any(not torch.equal(a, b) for a, b in zip(first, [x for x, _ in other.iter_from(0)]))
    single = list(_ra_loader(store, batch_size=4))
    per_rank = [list(_ra_loader(store, batch_size=2, rank=r, world_size=2)) for r in range(2)]
    assert_ranks_match_single(single, per_rank)


# ---- progressive resizing -----------------------------------------------------------------------------

def test_progressive_size_grows_linearly_on_the_rounding_grid():
    sizes = [progressive_size(e, (224, 224), 160, 2, 6) for e in range(8)]
    # epochs 1-2 at 160; 176, 192, 208 rounded (half up) to multiples of 32; 224 from epoch 6 on
    assert sizes == [(160, 160), (160, 160), (192, 192), (192, 192), (224, 224), (224, 224), (224, 224),
                     (224, 224)]
    assert [progressive_size(e, (32, 48), 16, 1, 3) for e in range(3)] == [(16, 24), (24, 40), (32, 48)]
    assert progressive_size(0, (80, 80), 32, 1, 5) == (32, 32) and progressive_size(2, (80, 80), 32, 1, 5) == (64, 64)


def test_progressive_resize_sizes_per_epoch_and_exact_resume_across_a_size_change(tmp_path, photos):
    options = dict(image_size=32, epochs=3, progressive_resize=[16, 1, 3], eval_image_size=24, augment="rrc-flip-ra")
    reference = tmp_path / "reference"
    fit(_config(photos, reference, **options), quiet=True)
    records = read_jsonl(reference / "metrics.jsonl")
    assert [r["train_size"] for r in records] == [[16, 16], [24, 24], [32, 32]]
    ckpt = load_checkpoint(reference / "last.safetensors")
    assert ckpt.meta["preprocess"]["crop"] == [24, 24] and ckpt.meta["input_size"] == [3, 24, 24]

    run = tmp_path / "run"

    def stop_after_one(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        fit(_config(photos, run, **options), on_epoch_end=stop_after_one, quiet=True)
    fit(TrainConfig(resume=str(run)), quiet=True)
    got, want = load_file(str(run / "last.safetensors")), load_file(str(reference / "last.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    keys = ("train_size", "train_loss", "train_top1", "test_loss", "test_top1", "lr")
    assert [{k: r[k] for k in keys} for r in read_jsonl(run / "metrics.jsonl")] == \
        [{k: r[k] for k in keys} for r in records]


# ---- pinned memory ------------------------------------------------------------------------------------

def test_cpu_loader_does_not_pin_memory(monkeypatch):
    def no_pinning(self, *args, **kwargs):
        raise AssertionError("pin_memory on a CPU run")

    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)
    loader = _ra_loader(_Store())
    assert loader.pin_memory is False
    x, y = next(iter(loader.iter_from(0)))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 8, 12) and y.dtype == torch.int64
    assert StoreLoader(_Store(), 4, (0.5,) * 3, (0.25,) * 3, train=True, image_size=8, device="cuda").pin_memory


# ---- configuration ------------------------------------------------------------------------------------

def test_cli_parses_the_new_options(photos):
    def parse(*extra: str) -> TrainConfig:
        args = build_parser().parse_args(["train", "--data", f"imagefolder:{photos}", "--store-size", "32", *extra])
        cfg = train_config(args)
        cfg.validate()
        return cfg

    assert parse("--image-size", "16").image_size == 16  # one number stays a number
    cfg = parse("--image-size", "16", "24", "--eval-image-size", "20", "--rrc-ratio", "0.5", "2",
                "--augment", "rrc-flip-ra", "--randaugment", "3", "5", "--epochs", "4",
                "--progressive-resize", "8", "1", "3")
    assert (cfg.image_size, cfg.eval_image_size, cfg.rrc_ratio) == ([16, 24], 20, [0.5, 2.0])
    assert (cfg.randaugment, cfg.progressive_resize) == ([3, 5], [8, 1, 3])
    assert math.isclose(TrainConfig().rrc_ratio[1], 4 / 3) and TrainConfig().randaugment == [2, 9]


@pytest.mark.parametrize("sizes, expected", [
    ({}, 146),  # the 128 px default crop, evaluated at floor(128 / 0.875)
    ({"image_size": 224}, 256),
    ({"image_size": 176, "eval_image_size": 224, "crop_pct": 224 / 232}, 232),  # FixRes: the evaluation decides
    ({"image_size": [96, 160], "crop_pct": 1.0}, 160),  # non-square: the longer side is never upscaled
    ({"image_size": 300, "crop_pct": 1.0}, 300),
])
def test_store_size_auto_is_the_larger_of_the_training_crop_and_the_evaluation_resize(sizes, expected):
    cfg, note = resolve_store_size(TrainConfig(data="imagefolder:x", store_size="auto", **sizes))
    assert cfg.store_size == expected and f"--store-size auto: {expected}" in note
    assert resolve_store_size(TrainConfig(store_size=40)) == (TrainConfig(store_size=40), None)


def test_store_size_auto_from_the_cli_and_yaml_trains_and_is_recorded(tmp_path, photos, capsys):
    args = build_parser().parse_args(["train", "--data", f"imagefolder:{photos}", "--store-size", "AUTO"])
    assert train_config(args).store_size == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--store-size", "big"])
    assert "whole number or auto" in capsys.readouterr().err
    assert TrainConfig.from_dict({"store_size": "auto"}).store_size == "auto"
    with pytest.raises(ConfigError, match="store_size' must be an integer or auto, got 'big'"):
        TrainConfig.from_dict({"store_size": "big"})
    fit(_config(photos, tmp_path / "run", store_size="auto"), quiet=False)
    assert load_checkpoint(tmp_path / "run" / "last.safetensors").meta["preprocess"]["store_size"] == 18  # 16/0.875
    assert "note: --store-size auto: 18" in capsys.readouterr().err
    assert "store_size: 18" in (tmp_path / "run" / "config.yaml").read_text()  # a resume keeps the same store


@pytest.mark.parametrize("options, message", [
    ({"image_size": [16, 24, 32]}, "image_size must be N or H W"),
    ({"image_size": [16, 0]}, "image_size must be N or H W"),
    ({"eval_image_size": [0]}, "eval_image_size must be N or H W"),
    ({"eval_image_size": 20, "store_size": None}, "eval_image_size: only for image-store data"),
    ({"rrc_ratio": [1.5, 0.5]}, "rrc_ratio must be LOW HIGH"),
    ({"rrc_ratio": [0.5]}, "rrc_ratio must be LOW HIGH"),
    ({"rrc_ratio": [0.5, 2.0], "store_size": None}, "rrc_ratio: only for image-store data"),
    ({"randaugment": [2, 9, 1], "augment": "rrc-flip-ra"}, "randaugment must be N M"),
    ({"randaugment": [0, 9], "augment": "rrc-flip-ra"}, "randaugment N (ops per image)"),
    ({"randaugment": [2, 31], "augment": "rrc-flip-ra"}, "randaugment M (magnitude level)"),
    ({"randaugment": [3, 9]}, "add --augment rrc-flip-ra"),
    ({"augment": "rrc-flip-ra", "store_size": None}, "is for image-store data"),
    ({"progressive_resize": [8, 1]}, "progressive_resize must be START_SIZE START_EPOCH END_EPOCH"),
    ({"progressive_resize": [12, 1, 2], "epochs": 2}, "must be a multiple of 8"),
    ({"progressive_resize": [24, 1, 2], "epochs": 2}, "START_SIZE must be a multiple of 8"),
    ({"progressive_resize": [8, 2, 2], "epochs": 2}, "1 <= START_EPOCH < END_EPOCH <= epochs (2)"),
    ({"progressive_resize": [8, 1, 5], "epochs": 2}, "1 <= START_EPOCH < END_EPOCH <= epochs (2)"),
    ({"progressive_resize": [8, 1, 2], "epochs": 2, "store_size": None}, "progressive_resize: only for image-store"),
])
def test_config_errors_name_the_value_and_the_fix(tmp_path, photos, options, message):
    with pytest.raises(ConfigError) as info:
        _config(photos, tmp_path / "run", **options).validate()
    assert message in str(info.value)
