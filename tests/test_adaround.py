"""4-bit weights: the per-channel grid, AdaRound against round-to-nearest on the same layer and data, the rounding
regulariser, seeding, storage, and the ONNX QDQ export (int4 and int8 containers) against the PyTorch model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge.compress.quantization.adaround import (
    adaround_layer,
    adaround_quantize,
    channel_scales,
    grid_levels,
    quantize_weights_nearest,
    reconstruction_error,
)
from convforge.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class _HeadFirst(nn.Module):
    """Registers its classifier before its convolutions: execution order differs from registration order."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv3(F.relu(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model = _HeadFirst()
    with torch.no_grad():  # non-trivial BatchNorm statistics to fold
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.weight.uniform_(0.5, 1.5)
    return model.eval(), torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _grid_integers(weight: torch.Tensor, scale: list[float]) -> torch.Tensor:
    return weight.detach() / torch.tensor(scale).reshape(-1, *([1] * (weight.dim() - 1)))


def test_every_weight_lies_on_its_grid(model_and_data):
    model, calib = model_and_data
    for quantized, report in (adaround_quantize(model, calib, 4, iterations=40, progress=False),
                              quantize_weights_nearest(model, 4, example=calib[:1])):
        modules = dict(quantized.named_modules())
        bits = {e["name"]: e["bits"] for e in report["layers"]}
        assert bits == {"conv1": 8, "conv2": 4, "conv3": 4, "fc": 8}  # first and last in execution order
        for entry in report["layers"]:
            q = _grid_integers(modules[entry["name"]].weight, entry["scale"])
            assert torch.allclose(q, q.round(), atol=1e-4)
            low, high = -(2 ** (entry["bits"] - 1)), 2 ** (entry["bits"] - 1) - 1
            assert q.round().min() >= low and q.round().max() <= high
            per_channel = max(len(torch.unique(row.round())) for row in q.flatten(1))
            assert per_channel <= 2 ** entry["bits"]
        levels = grid_levels(quantized, report)
        assert levels["conv2"] <= 16 and levels["conv3"] <= 16
        # BN was folded: the quantized model has no BatchNorm left and still tracks the float model
        assert not any(isinstance(m, nn.BatchNorm2d) for m in quantized.modules())
        with torch.no_grad():
            ref, out = model(calib), quantized(calib)
        assert float((out - ref).abs().max()) < 0.25 * float(ref.abs().max())


def test_scales_minmax_and_mse():
    weight = torch.tensor([[1.0, -0.5, 0.25, 0.1], [0.02, -0.04, 0.03, 0.01]])
    assert torch.allclose(channel_scales(weight, 4, "minmax"), torch.tensor([1.0 / 7, 0.04 / 7]))
    # an outlier: the MSE search clips it and wins on the squared rounding error
    outlier = torch.cat([torch.linspace(-0.1, 0.1, 63), torch.tensor([1.0])])[None]
    mse, minmax = channel_scales(outlier, 4, "mse"), channel_scales(outlier, 4, "minmax")
    err = {name: float((torch.clamp(torch.round(outlier / s), -8, 7) * s - outlier).pow(2).sum())
           for name, s in (("mse", mse), ("minmax", minmax))}
    assert mse < minmax and err["mse"] < err["minmax"]
    with pytest.raises(ConfigError, match="between 2 and 8"):
        channel_scales(weight, 1)


def _layer_problem():
    torch.manual_seed(3)
    layer = nn.Conv2d(8, 16, 3, padding=1)
    inputs = torch.relu(torch.randn(96, 8, 6, 6))
    with torch.no_grad():
        targets = F.conv2d(inputs, layer.weight, layer.bias, padding=1)
    return layer, inputs, targets, channel_scales(layer.weight, 4)


def test_adaround_beats_round_to_nearest_on_the_same_layer_and_data():
    layer, inputs, targets, scale = _layer_problem()
    layer.requires_grad_(False)
    nearest = torch.clamp(torch.round(layer.weight / scale[:, None, None, None]), -8, 7) * scale[:, None, None, None]
    rounded, stats = adaround_layer(layer, inputs, targets, scale, 4, iterations=400)
    # independent measurement of the squared output error (summed over channels, mean over images and positions)
    def error(weight):
        return float((F.conv2d(inputs, weight, layer.bias, padding=1) - targets).pow(2).sum(1).mean())

    assert error(rounded) < 0.8 * error(nearest), (error(rounded), error(nearest))
    assert reconstruction_error(layer, rounded, inputs, targets) == pytest.approx(error(rounded), rel=1e-5)
    # AdaRound only chooses between rounding down and up (each clamped to the grid's range)
    grid = rounded / scale[:, None, None, None]
    low = torch.floor(layer.weight.detach() / scale[:, None, None, None])
    down, up = torch.clamp(low, -8, 7), torch.clamp(low + 1, -8, 7)
    assert torch.all(((grid - down).abs() < 1e-4) | ((grid - up).abs() < 1e-4))
    assert stats["h_decided"] > 0.9


def test_the_regulariser_drives_h_to_zero_or_one():
    layer, inputs, targets, scale = _layer_problem()
    _, with_reg = adaround_layer(layer, inputs, targets, scale, 4, iterations=400)
    _, without = adaround_layer(layer, inputs, targets, scale, 4, iterations=400, reg_weight=0.0)
    assert with_reg["h_decided"] > 0.95
    assert without["h_decided"] < with_reg["h_decided"] - 0.2, (without, with_reg)


def test_model_level_errors_and_seeding(model_and_data):
    model, calib = model_and_data
    first, report = adaround_quantize(model, calib, 4, iterations=150, seed=5, progress=False)
    again, _ = adaround_quantize(model, calib, 4, iterations=150, seed=5, progress=False)
    other, _ = adaround_quantize(model, calib, 4, iterations=150, seed=6, progress=False)
    weights = [(a.weight, b.weight, c.weight) for a, b, c in zip(first.modules(), again.modules(), other.modules())
               if isinstance(a, (nn.Conv2d, nn.Linear))]
    assert all(torch.equal(a, b) for a, b, _ in weights)
    assert any(not torch.equal(a, c) for a, _, c in weights)
    for entry in report["layers"]:
        assert entry["error_adaround"] <= entry["error_nearest"] * 1.01, entry["name"]


def test_storage_counts_packed_bits(model_and_data):
    model, calib = model_and_data
    _, report = quantize_weights_nearest(model, 4, example=calib[:1])
    # conv1 8-bit (3*8*9), conv2 4-bit (8*16*9), conv3 4-bit (16*16*9), fc 8-bit (16*4)
    assert report["packed_weight_bytes"] == 216 + 576 + 1152 + 64
    assert report["scale_bytes"] == 4 * (8 + 16 + 16 + 4)
    assert report["bias_bytes"] == 4 * (8 + 16 + 16 + 4)  # conv1 gained its bias from the folded BatchNorm
    assert report["fp32_bytes"] == 4 * (216 + 1152 + 2304 + 64) + report["bias_bytes"]
    assert report["quantized_bytes"] < report["fp32_bytes"] / 5


def test_onnx_export_keeps_the_grid_and_matches_pytorch(digits_run, tmp_path):
    """Digits CNN, W4 (first/last 8-bit) AdaRound: the dequantized ONNX weights equal the PyTorch grid weights to
    float32 rounding; with uint8 activations the ONNX Runtime logits stay within 10% of the logit range of the
    PyTorch W4 model's (weights exact, activations quantized) and agree on >= 98% of top-1 predictions."""
    import onnx

    from convforge.compress.quantization.grid_onnx import export_grid_qdq
    from convforge.data import load, normalize
    from convforge.export.onnx import run_session, session
    from convforge.train import load_checkpoint

    ckpt = load_checkpoint(digits_run["run_dir"])
    data = load("digits")
    calib = normalize(data.train.images[:256], ckpt.mean, ckpt.std)
    x, y = normalize(data.test.images, ckpt.mean, ckpt.std), data.test.labels
    quantized, report = adaround_quantize(ckpt.model, calib, 4, iterations=200, progress=False)
    with torch.no_grad():
        expected = quantized(x).numpy()
        fp32_top1 = 100 * float((ckpt.model.eval()(x).argmax(1) == y).float().mean())
    assert 100 * float((torch.from_numpy(expected).argmax(1) == y).float().mean()) >= fp32_top1 - 2.0
    sizes = {}
    for weights in ("int4", "int8"):
        result = export_grid_qdq(quantized, report, tmp_path / f"w4-{weights}.onnx", ckpt.input_size, calib,
                                 weights=weights)
        assert result["weight_max_abs_diff"] < 1e-6
        got = run_session(session(result["onnx"]), x)
        assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.98
        types = {init.data_type for init in onnx.load(result["onnx"]).graph.initializer}
        assert (onnx.TensorProto.INT4 in types) == (weights == "int4")
        sizes[weights] = result["bytes"]
    assert sizes["int4"] < sizes["int8"]
    with pytest.raises(ConfigError, match="int4 or int8"):
        export_grid_qdq(quantized, report, tmp_path / "x.onnx", ckpt.input_size, calib, weights="int2")
    assert math.isfinite(report["layers"][1]["error_adaround"])


def test_cli_quantize_w4_adaround_beats_nearest_and_keeps_the_grid(digits_run, tmp_path, capsys):
    """`convforge quantize --weight-bits 4`: an int4 QDQ file whose weights are the 4-bit grid, scored against
    PyTorch fp32 on the same images; AdaRound loses no more than round-to-nearest; int8-only options refused."""
    import json

    from convforge.cli import main

    reports = {}
    for rounding in ("nearest", "adaround"):
        out = tmp_path / f"digits-{rounding}.onnx"
        code = main(["quantize", str(digits_run["run_dir"]), "--calib-data", "digits", "--calib-samples", "64",
                     "--weight-bits", "4", "--rounding", rounding, "--adaround-iterations", "200",
                     "--threads", "1", "--out", str(out), "--json"])
        assert code == 0
        reports[rounding] = json.loads(capsys.readouterr().out)
        assert out.is_file() and reports[rounding]["weights"].startswith("int4")
        assert reports[rounding]["weight_max_abs_diff"] < 1e-6  # the file holds the grid exactly
        assert reports[rounding]["eval"]["images"] == 360
        storage = reports[rounding]["storage"]
        assert storage["quantized_bytes"] < storage["fp32_bytes"] / 3
    fp32 = reports["adaround"]["top1_torch"]
    assert fp32 - reports["adaround"]["top1_w4"] <= max(3.0, fp32 - reports["nearest"]["top1_w4"] + 1.0)
    assert main(["quantize", str(digits_run["run_dir"]), "--calib-data", "digits", "--weight-bits", "4",
                 "--equalize", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "--equalize" in capsys.readouterr().err
