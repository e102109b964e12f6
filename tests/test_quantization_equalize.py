"""Cross-layer equalization (exact float function, equal channel ranges, lower per-tensor int8 error on a
depthwise network) and empirical bias correction."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from convforge.compress.quantization import PTQOptions, quantize_model
from convforge.compress.quantization.equalize import (
    conv_pairs,
    correct_bias,
    equalize,
    input_ranges,
    output_ranges,
    quantize_weight,
    range_balance,
    replace_relu6,
)
from convforge.compress.quantization.sensitivity import relative_error
from convforge.export import fold_for_inference
from convforge.layers import ConvNormAct
from convforge.export.onnx import run_session, session
from convforge.models import create_model


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _trained_like(model: nn.Module, spread: float = 1.0, size: int = 32, seed: int = 0) -> nn.Module:
    """``model`` with BatchNorm scales log-uniform in [e^-spread, e^spread] and statistics measured on random
    images: after folding, channel ranges spread over orders of magnitude, as in trained depthwise networks."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # running statistics = the average over the batches below
                m.weight.copy_(torch.exp(torch.empty_like(m.weight).uniform_(-spread, spread)))
                m.bias.normal_(0, 0.3)
        model.train()
        for _ in range(3):
            model(torch.randn(16, 3, size, size))
    return model.eval()


def _depthwise_net() -> nn.Module:
    """conv -> depthwise -> pointwise (ReLU6 between them, as in MobileNetV2) -> pool -> linear."""
    torch.manual_seed(0)
    return nn.Sequential(ConvNormAct(3, 16, 3, act=nn.ReLU6), ConvNormAct(16, 16, 3, groups=16, act=nn.ReLU6),
                         ConvNormAct(16, 32, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.mark.parametrize("name,kwargs", [("resnet20", {}), ("mobilenet_v2_cifar", {"width_mult": 0.25})])
def test_equalized_model_computes_the_same_function(name, kwargs):
    torch.manual_seed(0)
    folded = fold_for_inference(_trained_like(create_model(name, **kwargs))).double()
    reference = copy.deepcopy(folded)
    replaced = replace_relu6(reference, conv_pairs(reference))  # the paper's ReLU6 -> ReLU, applied alike
    report = equalize(folded)
    assert report["relu6_replaced"] == replaced
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected, got = reference(x), folded(x)
    assert float((got - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
    # every pair: both sides of each channel now share one range (converged: the scales are all 1)
    for first, second in report["pairs"]:
        torch.testing.assert_close(output_ranges(folded.get_submodule(first)),
                                   input_ranges(folded.get_submodule(second)), rtol=1e-4, atol=1e-12)
    assert report["range_balance_after"] > report["range_balance_before"]


def test_pairs_of_mobilenet_v2_include_depthwise_to_pointwise():
    model = fold_for_inference(create_model("mobilenet_v2_cifar", width_mult=0.25))
    pairs = {(p.first, p.second): p.activation for p in conv_pairs(model)}
    assert pairs[("features.2.conv.1.0", "features.2.conv.2")] == "features.2.conv.1.2"  # depthwise -> ReLU6 -> 1x1
    assert pairs[("features.2.conv.0.0", "features.2.conv.1.0")] == "features.2.conv.0.2"  # 1x1 -> ReLU6 -> depthwise
    assert pairs[("features.17.conv.2", "features.18.0")] is None  # linear bottleneck -> last 1x1 convolution
    assert ("features.3.conv.2", "features.4.conv.0.0") not in pairs  # a residual addition sits between them
    resnet = conv_pairs(fold_for_inference(create_model("resnet20")))
    assert [(p.first, p.second, p.activation) for p in resnet][0] == ("layer1.0.conv1", "layer1.0.conv2", "relu")


def test_equalize_needs_folded_batchnorm():
    with pytest.raises(Exception, match="BatchNorm folded"):
        equalize(create_model("resnet20"))


def test_equalization_lowers_per_tensor_int8_error_on_a_depthwise_model(tmp_path):
    model = _trained_like(_depthwise_net(), spread=3.0, size=16)
    calibration = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(2)).numpy()
    errors, balance = {}, None
    for equal in (False, True):
        report = quantize_model(model, tmp_path / f"m{int(equal)}.onnx", (3, 16, 16), calibration,
                                PTQOptions(per_channel=False, equalize=equal))
        reference = run_session(session(report["fp32_onnx"]), x)  # each against its own float model
        errors[equal] = relative_error(reference, run_session(session(report["onnx"]), x))
        balance = report.get("equalization", balance)
    assert errors[True] < 0.2 * errors[False], errors
    assert balance["range_balance_after"] > 2 * balance["range_balance_before"]
    assert len(balance["relu6_replaced"]) == 2 and len(balance["pairs"]) == 2


def test_bias_correction_removes_the_mean_output_shift_of_int8_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 1)  # 1x1: every output position sees the input's channel means exactly
    with torch.no_grad():
        conv.weight[0] *= 20  # a wide first filter: per-tensor steps are coarse for the others
    x = torch.randn(64, 4, 10, 10) + torch.tensor([2.0, -1.0, 0.5, 3.0]).reshape(1, 4, 1, 1)

    def mean_shift(layer: nn.Conv2d) -> torch.Tensor:
        quantized = copy.deepcopy(layer)
        with torch.no_grad():
            quantized.weight.copy_(quantize_weight(layer.weight, per_channel=False))
            return (quantized(x) - conv(x)).mean((0, 2, 3))

    before = mean_shift(conv)
    corrected = copy.deepcopy(conv)
    report = correct_bias(corrected, x, per_channel=False)
    after = mean_shift(corrected)
    assert report["layers"] == 1
    assert float(before.abs().max()) > 1e-2
    assert float(after.abs().max()) < 1e-4 * float(before.abs().max()) + 1e-6


def test_quantize_weight_matches_onnx_runtime_symmetric_int8():
    w = torch.tensor([[1.0, -0.5, 0.26], [0.01, 0.02, -0.04]]).reshape(2, 3, 1, 1)
    per_channel = quantize_weight(w)
    assert torch.allclose(per_channel[0].flatten(), torch.round(torch.tensor([1.0, -0.5, 0.26]) * 127) / 127)
    assert float(per_channel[1].abs().max()) == pytest.approx(0.04)
    per_tensor = quantize_weight(w, per_channel=False)
    assert torch.equal(per_tensor[1].flatten(), torch.round(torch.tensor([0.01, 0.02, -0.04]) * 127) / 127)
    assert range_balance(nn.Conv2d(1, 2, 1)) <= 1.0 and np.isfinite(range_balance(nn.Conv2d(1, 2, 1)))
