"""Static int8 calibration methods (ranges on hand-made tensors, accuracy on real digits), the CLI options of
`convforge quantize`, the warnings for combinations known to misbehave, and the CIFAR MobileNetV2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from convforge.compress.quantization import CalibrationSettings, PTQOptions, quantize_model
from convforge.compress.quantization.calibration import (
    HISTOGRAM_BINS,
    calibrate,
    mse_candidates,
    mse_range,
    tensor_ranges,
)
from convforge.compress.quantization.ptq import advice
from convforge.data import load, normalize
from convforge.errors import ConfigError
from convforge.export import onnx_top1, quantize_int8, to_onnx
from convforge.export.onnx import run_session, session
from convforge.measure import count_macs, count_params
from convforge.models import create_model, model_info
from convforge.train import load_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ---------------------------------------------------------------- MobileNetV2 for CIFAR


def _hook_macs(model: nn.Module, size: tuple[int, ...]) -> int:
    """Multiply-accumulates of every Conv2d and Linear, counted from their output shapes."""
    total = 0

    def conv(m, _inputs, out):
        nonlocal total
        total += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, _inputs, out):
        nonlocal total
        total += m.in_features * m.out_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear)
    with torch.no_grad():
        model(torch.zeros(1, *size))
    return total


def test_mobilenet_v2_cifar_params_shapes_macs():
    info = model_info("mobilenet_v2_cifar")
    assert info.input_size == (3, 32, 32) and info.num_classes == 10 and info.family == "mobilenet_v2"
    model = create_model("mobilenet_v2_cifar").eval()
    # only strides differ from the ImageNet network: its 3,504,872 parameters with a 10-class head
    assert count_params(model) == 3_504_872 - (1280 * 1000 + 1000) + (1280 * 10 + 10) == 2_236_682
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 1280, 4, 4)
        assert model(x).shape == (2, 10)
    macs = count_macs(model, (3, 32, 32))
    assert macs == _hook_macs(model, (3, 32, 32))
    assert 85e6 < macs < 90e6  # 88.0 M: a 32x32 input through the stride-1 stem and second stage


# ---------------------------------------------------------------- ranges on hand-made tensors


@pytest.fixture(scope="module")
def identity_onnx(tmp_path_factory):
    """A 1x1 convolution with weight 1: the calibrated range of its input is the range of the data."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    conv.weight.data.fill_(1.0)
    path = tmp_path_factory.mktemp("identity") / "identity.onnx"
    to_onnx(conv, path, (1, 16, 16), dynamic_batch=True)
    return path


def _input_range(path, data: np.ndarray, **settings) -> tuple[float, float]:
    halves = [data[: len(data) // 2], data[len(data) // 2:]]  # two batches: ranges merge across batches
    return tensor_ranges(calibrate(path, halves, CalibrationSettings(**settings)))["input"]


def _gaussian_with_outliers(seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((64, 1, 16, 16)).astype(np.float32)
    x.reshape(-1)[:: 4096] = 40.0  # 4 outliers among 16,384 values
    return x


def test_minmax_range_is_the_exact_extremes(identity_onnx):
    x = _gaussian_with_outliers()
    assert _input_range(identity_onnx, x, method="minmax") == (float(x.min()), float(x.max()))


def test_percentile_range_is_the_percentile_of_abs_values(identity_onnx):
    x = np.random.default_rng(1).laplace(0, 1, (64, 1, 16, 16)).astype(np.float32)
    lo, hi = _input_range(identity_onnx, x, method="percentile", percentile=99.0)
    magnitude = np.abs(x)
    target = float(np.quantile(magnitude, 0.99, method="inverted_cdf"))
    width = float(magnitude.max() - magnitude.min()) / HISTOGRAM_BINS
    assert 0 <= target - hi <= width + 1e-6  # the left edge of the histogram bin that holds the percentile
    assert lo == pytest.approx(-hi)  # symmetric, and inside [min, max]
    assert x.min() < lo and hi < x.max()


def test_entropy_threshold_is_below_the_max_with_outliers(identity_onnx):
    x = _gaussian_with_outliers()
    lo, hi = _input_range(identity_onnx, x, method="entropy")
    assert 3.0 < hi < 0.5 * float(x.max())  # keeps the Gaussian bulk, clips the outliers at 40
    assert lo == pytest.approx(max(-hi, float(x.min())), abs=0.1)


def _brute_force_mse(x: np.ndarray, lo: float, hi: float) -> float:
    """ONNX Runtime's uint8 grid for [lo, hi] applied with PyTorch's fake quantization."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    zero = int(round(-lo / scale))
    t = torch.from_numpy(x).double()
    q = torch.fake_quantize_per_tensor_affine(t.float(), scale, zero, 0, 255).double()
    return float(((q - t) ** 2).mean())


def test_mse_range_minimises_the_error_among_candidates(identity_onnx):
    # a million values: with 255 steps, clipping a rare outlier pays only when the bulk is this large
    x = np.random.default_rng(2).uniform(0, 1, (4096, 1, 16, 16)).astype(np.float32)
    x.reshape(-1)[::400_000] = 100.0
    lo, hi = _input_range(identity_onnx, x, method="mse")
    assert hi < 0.8 * float(x.max())  # the best clip is well inside the extremes
    candidates = mse_candidates(float(x.min()), float(x.max()), False, 200 / 8192)
    errors = [_brute_force_mse(x, a, b) for a, b in candidates]
    assert _brute_force_mse(x, lo, hi) <= min(errors) * 1.02
    assert _brute_force_mse(x, lo, hi) < 0.8 * _brute_force_mse(x, float(x.min()), float(x.max()))


def test_mse_range_pure_function_on_a_histogram():
    # a million values in [0, 1] and one at 100: clipping the one costs less than the coarse steps of [0, 100]
    values = np.r_[np.random.default_rng(3).uniform(0, 1, 1_000_000), [100.0]].astype(np.float32)
    edges = np.linspace(-100, 100, 8193)
    counts, _ = np.histogram(values, bins=edges)
    lo, hi = mse_range(counts, edges, 0.0, 100.0)
    candidates = mse_candidates(0.0, 100.0, False, float(edges[1] - edges[0]))
    best = min(candidates, key=lambda c: _brute_force_mse(values, *c))
    assert lo == 0.0 and 20 < hi < 80 and (lo, hi) == best
    assert _brute_force_mse(values, lo, hi) < 0.5 * _brute_force_mse(values, 0.0, 100.0)
    symmetric = mse_range(counts, edges, 0.0, 100.0, symmetric=True)
    assert symmetric[0] == -symmetric[1] and symmetric[1] < 100


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="--calib-method"):
        CalibrationSettings("kl")
    with pytest.raises(ConfigError, match="--calib-percentile"):
        CalibrationSettings("percentile", percentile=0)


# ---------------------------------------------------------------- accuracy on real digits


def test_every_method_stays_close_to_fp32_on_digits(digits_run, tmp_path):
    ckpt = load_checkpoint(digits_run["run_dir"])
    data = load("digits")
    calib = normalize(data.train.images[:128], ckpt.mean, ckpt.std)
    x, y = normalize(data.test.images, ckpt.mean, ckpt.std), data.test.labels
    legacy = quantize_int8(ckpt.model, tmp_path / "legacy.onnx", ckpt.input_size, calib)
    for method in ("minmax", "percentile", "entropy", "mse"):
        report = quantize_model(ckpt.model, tmp_path / f"{method}.onnx", ckpt.input_size, calib,
                                PTQOptions(CalibrationSettings(method)))
        fp32, int8 = onnx_top1(report["fp32_onnx"], x, y), onnx_top1(report["onnx"], x, y)
        assert fp32 > 80 and abs(int8 - fp32) <= 1.5, (method, fp32, int8)
        assert json.loads((tmp_path / f"{method}.onnx.json").read_text())["onnx"]["calibration"]["method"] == method
        if method == "minmax":  # the same ranges as the min-max path of convforge.export: the same model
            np.testing.assert_allclose(run_session(session(report["onnx"]), x[:64]),
                                       run_session(session(legacy["onnx"]), x[:64]), atol=1e-5)


# ---------------------------------------------------------------- warnings and the CLI


def test_known_bad_combinations_warn_with_a_fix():
    depthwise = create_model("mobilenet_v2_cifar", width_mult=0.25)
    per_tensor = advice(depthwise, PTQOptions(per_channel=False))
    assert len(per_tensor) == 1 and "per-channel" in per_tensor[0] and "--equalize" in per_tensor[0]
    assert advice(depthwise, PTQOptions(per_channel=False, equalize=True)) == []
    assert "depthwise" in advice(depthwise, PTQOptions(CalibrationSettings("entropy")))[0]
    resnet = create_model("resnet20")
    assert advice(resnet, PTQOptions(CalibrationSettings("mse"), per_channel=False)) == []
    entropy = advice(resnet, PTQOptions(CalibrationSettings("entropy")))
    assert len(entropy) == 1 and "ReLU outputs" in entropy[0] and "minmax or mse" in entropy[0]


def test_cli_calibration_options_and_sidecar(digits_run, tmp_path, capsys):
    from convforge.cli import main

    out = tmp_path / "d-int8.onnx"
    code = main(["quantize", str(digits_run["run_dir"]), "--calib-data", "digits", "--calib-samples", "128",
                 "--calib-method", "percentile", "--calib-percentile", "99.9", "--per-tensor", "--symmetric",
                 "--max-drop", "100", "--threads", "1", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["calibration"] == {"method": "percentile", "percentile": 99.9, "symmetric": True}
    assert report["weights"] == "int8 per-tensor" and report["activations"].startswith("int8 symmetric")
    assert report["mixed_precision"]["float_layers"] == [] and len(report["mixed_precision"]["trials"]) == 1
    assert [r["error"] for r in report["sensitivity"]["layers"]] == sorted(
        (r["error"] for r in report["sensitivity"]["layers"]), reverse=True)
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())["onnx"]
    assert sidecar["mixed_precision"]["drop"] == report["mixed_precision"]["drop"] <= 100
    import onnx

    types = {init.data_type for init in onnx.load(str(out)).graph.initializer}
    assert onnx.TensorProto.UINT8 not in types  # symmetric: int8 activations, no uint8 zero points
    code = main(["quantize", str(digits_run["run_dir"]), "--calib-data", "digits", "--calib-percentile", "99"])
    assert code == 2 and "--calib-method percentile" in capsys.readouterr().err


def test_cli_registry_model_takes_the_class_names_of_the_data(tmp_path, capsys):
    from helpers import TINY_SYNTH

    from convforge.cli import main

    code = main(["quantize", "smallcnn", "--in-chans", "3", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25",
                 "0.25", "--calib-data", TINY_SYNTH, "--calib-samples", "16", "--calib-method", "mse", "--equalize",
                 "--bias-correction", "--threads", "1", "--out", str(tmp_path / "s.onnx"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["eval"]["images"] == 32 and report["calibration"]["method"] == "mse"
    assert report["equalization"]["pairs"] == [["stem.0", "stages.0.0.0"]]  # the others meet a max-pool first
    assert report["bias_correction"]["layers"] == 4
