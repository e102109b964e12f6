"""ZeroQ data-free calibration: the BatchNorm-statistics objective falls, the distilled batch reproduces the running
statistics, the images are seeded, and int8 calibrated on them scores like int8 calibrated on real images."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge.compress.quantization.zeroq import batchnorm_layers, distill_calibration_images, zeroq_loss
from convforge.errors import ConfigError

SIZE = (3, 12, 12)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _smooth_images(count: int, generator: torch.Generator) -> torch.Tensor:
    """Normalised (per-channel mean 0, std 1) but spatially smooth, channel-correlated images: unlike white noise."""
    x = F.interpolate(torch.randn(count, 3, 4, 4, generator=generator), size=SIZE[1:], mode="bilinear")
    x = x + 0.7 * torch.roll(x, 1, dims=1)
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)


@pytest.fixture(scope="module")
def bn_model() -> nn.Module:
    """Two conv-BN-ReLU blocks whose running statistics are the exact averages over 20 batches of smooth images."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():
        for bn in batchnorm_layers(model):
            bn.momentum = None  # cumulative average
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
        model.train()
        generator = torch.Generator().manual_seed(1)
        for _ in range(20):
            model(_smooth_images(64, generator))
    return model.eval()


def _batch_stats(model: nn.Module, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen = []
    handles = [bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for bn in batchnorm_layers(model)]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return [(x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False).sqrt()) for x in seen]


def test_objective_falls_by_a_large_factor(bn_model):
    noise = torch.randn((32, *SIZE), generator=torch.Generator().manual_seed(0))  # the seed-0 start
    distilled = distill_calibration_images(bn_model, 32, SIZE, iterations=300, batch_size=16, seed=0, progress=False)
    before, after = zeroq_loss(bn_model, noise), zeroq_loss(bn_model, distilled)
    assert before > 0.1
    assert after < before / 1000, (before, after)
    assert distilled.shape == (32, *SIZE) and distilled.dtype == torch.float32


def test_distilled_batch_matches_running_statistics(bn_model):
    distilled = distill_calibration_images(bn_model, 32, SIZE, iterations=300, batch_size=16, seed=0, progress=False)
    noise = torch.randn((32, *SIZE), generator=torch.Generator().manual_seed(5))
    for images, tolerance in ((distilled, 0.01), (noise, None)):
        worst = 0.0
        for (mean, std), bn in zip(_batch_stats(bn_model, images), batchnorm_layers(bn_model)):
            sigma = bn.running_var.sqrt()
            worst = max(worst, float(((mean - bn.running_mean) / sigma).abs().max()),
                        float((std / sigma - 1).abs().max()))
        if tolerance is None:
            assert worst > 0.2  # white noise is far off: the match is the optimisation's doing
        else:
            assert worst < tolerance, worst


def test_same_seed_same_images_other_seed_other_images(bn_model):
    def run(seed):
        return distill_calibration_images(bn_model, 10, SIZE, iterations=15, batch_size=4, seed=seed, progress=False)

    first = run(7)
    assert torch.equal(first, run(7))
    assert not torch.allclose(first, run(8))
    # the model itself is untouched (a frozen copy is optimised through)
    assert all(p.requires_grad for p in bn_model.parameters()) and not bn_model.training


def test_a_model_without_batchnorm_is_a_clear_error():
    with pytest.raises(ConfigError, match="BatchNorm"):
        distill_calibration_images(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), 4, SIZE, iterations=1)


def test_int8_calibrated_on_distilled_data_scores_like_real_calibration(digits_run, tmp_path):
    """Digits small CNN: int8 with 128 ZeroQ images vs 256 real training images, within 2 points on the 360 test
    images (the issue's bar is 1.0 on CIFAR-10; digits has 0.28 points per image)."""
    from convforge.data import load, normalize
    from convforge.export import onnx_top1, quantize_int8
    from convforge.train import load_checkpoint

    ckpt = load_checkpoint(digits_run["run_dir"])
    data = load("digits")
    real = normalize(data.train.images[:256], ckpt.mean, ckpt.std)
    distilled = distill_calibration_images(ckpt.model, 128, ckpt.input_size, iterations=200, seed=0, progress=False)
    x, y = normalize(data.test.images, ckpt.mean, ckpt.std), data.test.labels
    scores = {}
    for name, calibration in (("real", real), ("zeroq", distilled)):
        report = quantize_int8(ckpt.model, tmp_path / f"{name}.onnx", ckpt.input_size, calibration)
        scores[name] = onnx_top1(report["onnx"], x, y)
        scores["fp32"] = onnx_top1(report["fp32_onnx"], x, y)
    assert scores["fp32"] > 80
    assert abs(scores["zeroq"] - scores["real"]) <= 2.0, scores
    assert abs(scores["zeroq"] - scores["fp32"]) <= 2.0, scores


def test_per_image_statistics_match_every_image(bn_model):
    """statistics="image" (the reference code's variant) makes each image, not just the batch, match."""
    distilled = distill_calibration_images(bn_model, 8, SIZE, iterations=300, batch_size=8, statistics="image",
                                           progress=False)
    for image in distilled:
        (mean, std), *_ = _batch_stats(bn_model, image[None])
        bn = batchnorm_layers(bn_model)[0]
        assert float(((mean - bn.running_mean) / bn.running_var.sqrt()).abs().max()) < 0.05
        assert float((std / bn.running_var.sqrt() - 1).abs().max()) < 0.05
    with pytest.raises(ConfigError, match="'batch' or 'image'"):
        zeroq_loss(bn_model, distilled, statistics="pixel")


def test_cli_quantize_with_zeroq_calibration(digits_run, tmp_path, capsys):
    import json

    from convforge.cli import main

    out = tmp_path / "digits-zeroq-int8.onnx"
    code = main(["quantize", str(digits_run["run_dir"]), "--calib-data", "zeroq", "--calib-samples", "16",
                 "--data", "digits", "--threads", "1", "--out", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["calibration_images"] == 16 and report["eval"]["images"] == 360
    assert abs(report["top1_int8"] - report["top1_fp32"]) <= 2.0
    assert main(["quantize", str(digits_run["run_dir"]), "--calib-data", "zeroq", "--out", str(out)]) == 2
    assert "--data SPEC" in capsys.readouterr().err
