"""Saliency maps (convforge.inspect.saliency, ``convforge explain``): exact checks against hand computations and
FullGrad's completeness, and faithfulness checks on a small CNN trained on scikit-learn's digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from convforge.cli import main
from convforge.inspect.saliency import (
    METHODS,
    default_layer,
    deletion_insertion,
    explain,
    fullgrad_decomposition,
    integrated_gradients,
    overlay,
    randomisation_check,
    spearman,
)
from convforge.models import create_model
from convforge.train.checkpoint import save_checkpoint
from helpers import save_image

SIDE = 16
WIDTHS = (16, 32, 64)
# per-method options that keep the file fast: IG with 32 steps, occlusion with 4x4 windows at stride 2
FAST = {"ig": {"n_steps": 32}, "occlusion": {"window": 4, "stride": 2}}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # deterministic training, and the measured thresholds below stay reproducible


@pytest.fixture(scope="module")
def digits() -> dict:
    """smallcnn (16, 32, 64) trained for 4 epochs on 1500 digits upsampled to 16x16 (about 98.7% on the other
    297); images normalised with the data's mean and std."""
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_digits()
    raw = F.interpolate(torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0, size=SIDE,
                        mode="bilinear", align_corners=False).clamp(0, 1)
    raw = torch.round(raw * 255) / 255  # exactly what a uint8 PNG of the image holds
    mean, std = raw.mean().item(), raw.std().item()
    labels = torch.tensor(data.target)
    order = torch.randperm(len(raw))
    raw, labels = raw[order], labels[order]
    x = (raw - mean) / std
    model = create_model("smallcnn", num_classes=10, in_chans=1, widths=WIDTHS)
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(4):
        model.train()
        for i in range(0, 1500, 50):
            loss = F.cross_entropy(model(x[i:i + 50]), labels[i:i + 50])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[1500:]).argmax(1) == labels[1500:]).float().mean().item()
    assert accuracy > 0.95, accuracy
    return {"model": model, "x": x[1500:1532], "raw": raw[1500:1532], "mean": mean, "std": std}


def _completeness_error(model: nn.Module, x: torch.Tensor, target) -> float:
    input_grad, terms = fullgrad_decomposition(model, x, target)
    with torch.no_grad():
        logits = model(x).gather(1, torch.as_tensor(target).view(-1, 1))[:, 0]
    total = (input_grad * x).flatten(1).sum(1) + sum(term.flatten(1).sum(1) for term in terms)
    return float((total - logits).abs().max())


def _random_batch_norms(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial implicit biases
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.3, 0.3)


def test_fullgrad_completeness_resnet20():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).double().eval()
    _random_batch_norms(model)
    # resnet20 applies F.relu (no ReLU modules, nothing in place): the reused/in-place case is the next test's
    assert not [m for m in model.modules() if getattr(m, "inplace", False)]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert _completeness_error(model, x, [3, 7]) < 1e-4
    _, terms = fullgrad_decomposition(model, x, [3, 7])
    assert len(terms) == 19 + 1  # 19 batch norms and the linear bias


class ReusingNet(nn.Module):
    """One in-place ReLU module called four times and one conv (with bias) called twice per forward pass."""

    def __init__(self, channels: int = 1, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(self.relu(x), 1).flatten(1))


def test_fullgrad_completeness_with_reused_modules_and_in_place_relu():
    torch.manual_seed(1)
    model = ReusingNet().double().eval()
    _random_batch_norms(model)
    x = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    assert _completeness_error(model, x, [0, 2, 4]) < 1e-4
    _, terms = fullgrad_decomposition(model, x, [0, 2, 4])
    assert len(terms) == 6  # conv1, bn1, conv2 (1st call), bn2, conv2 (2nd call), fc
    assert model.relu.inplace


class TinyCam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def test_gradcam_and_gradcam_pp_equal_hand_computations():
    torch.manual_seed(0)
    model = TinyCam().eval()
    x = torch.randn(2, 3, 6, 5)
    assert default_layer(model, x) == "act"  # not the 1x1 output of the global pooling
    with torch.no_grad():
        acts = model.act(model.conv(x))
    target = torch.tensor([2, 0])
    grad = model.fc.weight[target].detach() / (6 * 5)  # d logit_c / d A_k,ij = w_ck / (H W), the same everywhere
    expected = F.relu((grad[:, :, None, None] * acts).sum(1))
    assert torch.allclose(explain(model, x, "gradcam", target=target), expected, atol=1e-6)
    # Grad-CAM++ with a constant gradient g_k: weight_k = H W ReLU(g_k) g_k^2 / (2 g_k^2 + sum_ij A_kij g_k^3)
    total = acts.sum(dim=(2, 3))
    pp = 30 * F.relu(grad) * grad ** 2 / (2 * grad ** 2 + total * grad ** 3)
    expected_pp = F.relu((pp[:, :, None, None] * acts).sum(1))
    assert torch.allclose(explain(model, x, "gradcam++", target=target, layer="act"), expected_pp, atol=1e-6)
    assert default_layer(create_model("resnet20", num_classes=10), torch.zeros(1, 3, 32, 32)) == "layer3.2"


def test_explaining_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = ReusingNet(channels=3).eval()
    model.bn1.train()  # a mixed mode is restored as it was, not flattened
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        before = model(x)
    for method in METHODS:
        maps = explain(model, x, method, **FAST.get(method, {}))
        assert maps.shape == (2, 12, 12) and torch.isfinite(maps).all()
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert model.relu.inplace and model.bn1.training and not model.bn2.training and not model.training
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    assert all(p.grad is None for p in model.parameters())


def test_integrated_gradients_completeness(digits):
    model, x = digits["model"], digits["x"][:8]
    maps, delta = integrated_gradients(model, x, n_steps=64, return_delta=True)
    with torch.no_grad():
        logits = model(x)
        gap = (logits - model(torch.zeros_like(x))).gather(1, logits.argmax(1, keepdim=True))[:, 0]
    # the maps sum (over pixels) to f(x) - f(baseline) up to captum's convergence delta
    assert torch.allclose(maps.flatten(1).sum(1).double() - delta, gap.double(), atol=1e-4)
    assert float((delta.abs() / gap.abs()).max()) < 0.01, (delta, gap)  # measured: 0.003


# Mean rank correlation, trained vs top-3-randomised (fc, last conv and BN), measured with one thread for training
# seeds 0 (this fixture) / 1 / 2 / 3: gradcam 0.25 / 0.07 / -0.14 / 0.07, fullgrad 0.25 / 0.18 / 0.32 / 0.24,
# ig 0.05 / 0.01 / -0.10 / -0.02 (trained vs itself: 1.0).
RANDOMISED_BELOW = {"gradcam": 0.35, "fullgrad": 0.4, "ig": 0.15}


@pytest.mark.parametrize("method", sorted(RANDOMISED_BELOW))
def test_maps_depend_on_the_learned_weights(digits, method):
    model, x = digits["model"], digits["x"]
    opts = {"n_steps": 16} if method == "ig" else {}
    maps = explain(model, x, method, **opts)
    again = explain(model, x, method, **opts)
    assert np.mean([spearman(a, b) for a, b in zip(maps, again)]) > 0.999  # trained vs itself
    rho = randomisation_check(model, x, method, layers_from_top=3, **opts)
    print(f"{method}: mean Spearman trained vs top-3 randomised {rho.mean():.3f}")
    assert rho.mean() < RANDOMISED_BELOW[method], rho


# Area differences to a random map (deletion: lower is better; insertion: higher), measured for training seeds
# 0-3 with pixels removed by a sigma-4 blur (a sigma-2 blur leaves a 16-pixel digit readable): insertion beats
# random for every method and seed by 0.08 to 0.31; deletion by 0.05 to 0.18 for ig and occlusion, while
# gradcam, gradcam++ and fullgrad (coarse 4x4 or |evidence| maps) range from -0.10 to +0.01 (seed 0: -0.10,
# -0.09, -0.04). A grey (mean) fill instead puts fullgrad's deletion above random's (+0.01 to +0.02) on all four.
DELETION_MARGIN = {"ig": 0.03, "occlusion": 0.03}


def test_deletion_and_insertion_beat_a_random_map(digits):
    model, x = digits["model"], digits["x"]
    random_maps = torch.rand(x.shape[0], SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    protocol = {"steps": 16, "baseline": "blur", "blur_sigma": 4.0}
    chance = deletion_insertion(model, x, random_maps, **protocol)
    for method in METHODS:
        scores = deletion_insertion(model, x, explain(model, x, method, **FAST.get(method, {})), **protocol)
        print(f"{method}: deletion {scores['deletion'].mean():.3f} vs random {chance['deletion'].mean():.3f}, "
              f"insertion {scores['insertion'].mean():.3f} vs random {chance['insertion'].mean():.3f}")
        assert scores["deletion"].mean() < chance["deletion"].mean() - DELETION_MARGIN.get(method, 0.0), method
        assert scores["insertion"].mean() > chance["insertion"].mean() + 0.05, method
        curve = scores["deletion_curve"]
        assert curve.shape == (x.shape[0], 17) and torch.allclose(curve[:, 0], scores["insertion_curve"][:, -1])


def test_overlay_blends_a_jet_map_and_takes_grey_images():
    from matplotlib import colormaps

    grey = np.full((6, 8), 100, np.uint8)
    saliency = np.zeros((3, 4))
    saliency[0, 0] = 5.0
    for image in (grey, grey[..., None], np.repeat(grey[..., None], 3, axis=2)):
        picture = overlay(image, saliency)
        assert picture.mode == "RGB" and picture.size == (8, 6)
    hot = overlay(grey, np.where(np.arange(48).reshape(6, 8) == 0, 1.0, 0.0))
    expected = np.rint(0.5 * 100 + 0.5 * 255 * np.array(colormaps["jet"](1.0)[:3]))
    assert np.array_equal(np.asarray(hot)[0, 0], expected.astype(np.uint8))
    flat = np.asarray(overlay(grey, np.ones((6, 8)))).reshape(-1, 3)
    assert len(np.unique(flat, axis=0)) == 1  # a constant map: one colour, no error


@pytest.fixture
def digits_checkpoint(digits, tmp_path) -> tuple[Path, list[Path]]:
    meta = {"model": {"name": "smallcnn", "args": {"widths": list(WIDTHS)}, "num_classes": 10, "in_chans": 1},
            "classes": [str(i) for i in range(10)], "input_size": [1, SIDE, SIDE],
            "normalization": {"mean": [digits["mean"]], "std": [digits["std"]]}}
    ckpt = save_checkpoint(tmp_path / "digits.safetensors", digits["model"], meta)
    images = [save_image(tmp_path / f"d{i}.png", np.rint(digits["raw"][i, 0].numpy() * 255).astype(np.uint8))
              for i in range(2)]
    return ckpt, images


def test_explain_command_writes_overlays_grids_and_json(digits_checkpoint, tmp_path, capsys):
    ckpt, images = digits_checkpoint
    out = tmp_path / "out"
    code = main(["explain", str(ckpt), *map(str, images), "--method", "all", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["methods"] == list(METHODS) and result["layer"] == "stages.1.1"
    assert json.loads((out / "explain.json").read_text())["explanations"] == result["explanations"]
    assert main(["predict", str(ckpt), *map(str, images), "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)["predictions"]
    for record, prediction in zip(result["explanations"], predicted):
        assert record["class"] == prediction["top"][0]["class"] == record["target"]
        assert record["probability"] == pytest.approx(prediction["top"][0]["probability"], abs=1e-6)
        assert sorted(record["files"]) == sorted(METHODS)
        for name in record["files"].values():
            with Image.open(out / name) as picture:
                assert picture.size == (SIDE, SIDE) and picture.mode == "RGB"
        with Image.open(out / record["grid"]) as picture:
            assert picture.size[0] > 6 * 128 and picture.size[1] > 128
    assert main(["explain", str(ckpt), str(images[0]), "--method", "gradcam", "--target", "3", "--out",
                 str(tmp_path / "t")]) == 0
    assert "d0.png" in capsys.readouterr().out
    assert json.loads((tmp_path / "t" / "explain.json").read_text())["explanations"][0]["target"] == "3"


def test_explain_command_errors_are_clear(digits_checkpoint, tmp_path, capsys):
    ckpt, images = digits_checkpoint
    out = str(tmp_path / "out")
    assert main(["explain", str(ckpt), str(images[0]), "--method", "gradcam,lime", "--out", out]) != 0
    err = capsys.readouterr().err
    assert "'lime'" in err and all(name in err for name in METHODS)
    assert main(["explain", str(ckpt), str(images[0]), "--layer", "stages.9", "--out", out]) != 0
    err = capsys.readouterr().err
    assert "stages.9" in err and "stages.1.1" in err and "stem.0" in err
    assert main(["explain", str(ckpt), str(images[0]), "--target", "cat", "--out", out]) != 0
    assert "'cat'" in capsys.readouterr().err
    seg = create_model("unet", num_classes=3, in_chans=3, base_width=4)
    meta = {"task": "segment", "model": {"name": "unet", "args": {"base_width": 4}, "num_classes": 3, "in_chans": 3},
            "classes": ["a", "b", "c"], "input_size": [3, 32, 32],
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    seg_ckpt = save_checkpoint(tmp_path / "seg.safetensors", seg, meta)
    assert main(["explain", str(seg_ckpt), str(images[0]), "--out", out]) != 0
    assert "classifiers only" in capsys.readouterr().err
    assert not Path(out).exists()
