"""SpeedNet: the whitening stem whitens, is frozen, and the engine initialises it from the training images."""

from __future__ import annotations

import torch

from convforge import TrainConfig, fit
from convforge.models import create_model
from convforge.train import load_checkpoint


def test_whitening_stem_decorrelates_patches():
    gen = torch.Generator().manual_seed(0)
    # correlated channels and neighbouring pixels: a smooth random field mixed across channels
    base = torch.nn.functional.interpolate(torch.randn(64, 3, 9, 9, generator=gen), size=(32, 32), mode="bilinear")
    images = torch.einsum("ij,njhw->nihw", torch.tensor([[1.0, 0.8, 0.3], [0.2, 1.0, 0.5], [0.4, 0.1, 1.0]]), base)
    model = create_model("speednet_small", num_classes=10)
    model.init_from_data(images, eps=1e-8)
    assert not model.stem.weight.requires_grad and model.stem.bias.requires_grad
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, model.stem.weight)  # without bias: the whitened patches
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = torch.cov(half.T)
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)  # whitened: unit variance, no correlation
    assert torch.allclose(out[:, 12:], -out[:, :12])  # both signs of every eigenvector
    assert model(images[:2]).shape == (2, 10)


def test_engine_initialises_the_stem_from_training_images(tmp_path):
    torch.manual_seed(0)
    untouched = create_model("speednet_small", num_classes=3, in_chans=3).stem.weight.clone()
    fit(TrainConfig(model="speednet_small", data="synthetic:classes=3,size=16,train=64,test=16", epochs=1,
                      batch_size=16, threads=1, out=str(tmp_path / "run")), quiet=True)
    stem = load_checkpoint(tmp_path / "run").model.stem.weight
    assert not torch.allclose(stem, untouched)
    assert torch.allclose(stem[12:], -stem[:12])  # the whitening filters, frozen through training


def test_whiten_false_keeps_a_plain_trainable_stem():
    torch.manual_seed(0)
    model = create_model("speednet", num_classes=10, widths=[16, 32, 32], whiten=False)
    before = model.stem.weight.clone()
    model.init_from_data(torch.randn(64, 3, 32, 32) * 3)
    assert torch.equal(model.stem.weight, before) and model.stem.weight.requires_grad
    whitened = create_model("speednet", num_classes=10, widths=[16, 32, 32])
    smooth = torch.nn.functional.interpolate(torch.randn(64, 3, 8, 8), size=32, mode="bilinear")  # photo-like
    whitened.init_from_data(smooth)
    assert not whitened.stem.weight.requires_grad
    # the whitening stem's gain on the faintest patch direction is what makes small perturbations strong
    assert whitened.stem.weight.flatten(1).norm(dim=1).max() > 5 * model.stem.weight.flatten(1).norm(dim=1).max()
