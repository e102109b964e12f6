"""Super-resolution pieces: MATLAB bicubic resize, PSNR/SSIM, the SR models, data, loader and evaluation.

The benchmark figures at the end need ../shared/datasets/sr-benchmarks.tar.gz and are skipped without it.
"""

from __future__ import annotations

import math
import tarfile

import numpy as np
import pytest
import torch
from torch import nn

from convforge.data import Split
from convforge.data.resize import cubic, imresize, resize_matrix
from convforge.data.superres import (
    SuperResLoader,
    dihedral,
    extract_patches,
    load_sr_image_y,
    load_sr_folder,
    load_superres,
    modcrop,
    rgb_to_ycbcr,
    rgb_to_ycbcr_y,
    to_uint8,
    upscale_rgb,
    ycbcr_to_rgb,
)
from convforge.errors import ConfigError, DataError
from convforge.measure import count_params
from convforge.measure.quality import psnr, ssim
from convforge.measure.superres import evaluate_superres
from convforge.models import create_model, model_info
from helpers import SHARED, save_image

SR_TAR = SHARED / "datasets" / "sr-benchmarks.tar.gz"


# ---------------------------------------------------------------- imresize, worked out by hand
#
# Downscaling by 2 (scale s = 0.5): the kernel is h(d) = s * cubic(s * d), 8 taps wide, and output
# pixel x reads u = x/s + 0.5 * (1 - 1/s) = 2x - 0.5, so for x = 1, u = 1.5 and the taps are at
# i = -2 .. 5, distances d = u - i = 3.5, 2.5, ..., -3.5, i.e. cubic(1.75), cubic(1.25), cubic(0.75),
# cubic(0.25) and mirrored:
#   cubic(0.25) = 1.5/64 - 2.5/16 + 1            = 0.8671875
#   cubic(0.75) = 1.5*27/64 - 2.5*9/16 + 1       = 0.2265625
#   cubic(1.25) = -0.5*125/64 + 2.5*25/16 - 5 + 2 = -0.0703125
#   cubic(1.75) = -0.5*343/64 + 2.5*49/16 - 7 + 2 = -0.0234375
# They sum to 2 (each value twice), so the normalised weights are half of them. MATLAB mirrors
# indices with [1 2 3 4 4 3 2 1]: i = 0 -> 1, -1 -> 2, -2 -> 3 and 5 -> 4, so the pixels 1..4 get
#   1: w(0) + w(1)   = 0.11328125 + 0.43359375  =  0.546875
#   2: w(-1) + w(2)  = -0.03515625 + 0.43359375 =  0.3984375
#   3: w(-2) + w(3)  = -0.01171875 + 0.11328125 =  0.1015625
#   4: w(4) + w(5)   = -0.03515625 - 0.01171875 = -0.046875
# and the ramp [0, 1, 2, 3] becomes [0.3984375 + 0.203125 - 0.140625, 3 - that] = [0.4609375, 2.5390625].
DOWN_ROW = [0.546875, 0.3984375, 0.1015625, -0.046875]
DOWN_RAMP = [0.4609375, 2.5390625]
#
# Upscaling [0, 1] by 2: u = x/2 + 0.25 = 0.75, 1.25, 1.75, 2.25. For x = 1 the taps i = -1..2 are at
# d = 1.75, 0.75, -0.25, -1.25 with weights -0.0234375, 0.2265625, 0.8671875, -0.0703125 (sum 1);
# mirroring [1 2 2 1] sends i = 0 to pixel 1 and i = -1 to pixel 2: pixel 1 gets 0.2265625 + 0.8671875
# = 1.09375, pixel 2 gets -0.0234375 - 0.0703125 = -0.09375, so out(1) = -0.09375. For x = 2 (u = 1.25):
# pixel 1 gets -0.0703125 + 0.8671875 = 0.796875, pixel 2 gets 0.2265625 - 0.0234375 = 0.203125, so
# out(2) = 0.203125; the other two follow by symmetry. Bicubic overshoots: nothing is clamped.
UP_PAIR = [-0.09375, 0.203125, 0.796875, 1.09375]


def test_cubic_kernel_values():
    d = torch.tensor([0.0, 0.25, 0.75, 1.0, 1.25, 1.75, 2.0, 2.5], dtype=torch.float64)
    assert cubic(d).tolist() == [1.0, 0.8671875, 0.2265625, 0.0, -0.0703125, -0.0234375, 0.0, 0.0]


def test_imresize_downscale_by_two_by_hand():
    assert resize_matrix(4, 2, 0.5).tolist() == [DOWN_ROW, DOWN_ROW[::-1]]
    ramp = torch.arange(4, dtype=torch.float64)
    rows = ramp.expand(3, 4)[None, None]  # every row is the ramp: the columns are constant
    out = imresize(rows, scale=0.5)
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0].tolist() == [DOWN_RAMP, DOWN_RAMP]
    # separable: an outer product r c^T becomes (M r)(M c)^T
    outer = imresize((ramp[:, None] * ramp[None, :])[None, None], scale=0.5)[0, 0]
    expected = torch.tensor(DOWN_RAMP, dtype=torch.float64)
    assert torch.allclose(outer, expected[:, None] * expected[None, :], atol=1e-12)


def test_imresize_upscale_by_two_by_hand():
    x = torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64)
    assert imresize(x, scale=2)[0, 0].tolist() == [UP_PAIR, UP_PAIR]
    assert imresize(x.transpose(-1, -2), scale=2)[0, 0, :, 0].tolist() == UP_PAIR
    assert imresize(x.float(), scale=2).dtype == torch.float32


def _matlab_reference(x: list[float], out_length: int, scale: float) -> list[float]:
    """MATLAB's imresize contributions along one dimension, one output pixel at a time (1-based)."""
    n = len(x)
    width = 4 / scale if scale < 1 else 4

    def h(d):
        return scale * float(cubic(torch.tensor(scale * d))) if scale < 1 else float(cubic(torch.tensor(d)))

    mirror = list(range(1, n + 1)) + list(range(n, 0, -1))
    out = []
    for j in range(1, out_length + 1):
        u = j / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        taps = [left + k for k in range(math.ceil(width) + 2)]
        weights = [h(u - i) for i in taps]
        total = sum(weights)
        out.append(sum(w / total * x[mirror[(i - 1) % (2 * n)] - 1] for w, i in zip(weights, taps)))
    return out


# Short lines go through a dense matrix, long ones (here 50 and more) tap by tap: both are checked.
@pytest.mark.parametrize("length,scale", [(7, 1 / 3), (10, 0.4), (9, 0.25), (5, 3), (6, 2), (9, 1.5), (4, 4),
                                          (60, 3), (130, 1 / 3), (150, 0.25), (50, 2.5)])
def test_imresize_matches_matlab_formulas_pixel_by_pixel(length, scale):
    x = torch.rand(length, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
    out = imresize(x[None, :], scale=scale)[0]
    assert out.shape == (math.ceil(length * scale - 1e-9),)
    assert torch.allclose(out, torch.tensor(_matlab_reference(x.tolist(), out.shape[0], scale), dtype=torch.float64),
                          atol=1e-12)


def test_imresize_tap_by_tap_equals_dense_matrices_on_both_axes():
    x = torch.rand(2, 3, 130, 170, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for scale in (3, 1 / 3, 0.25, 2):
        out = imresize(x, scale=scale)
        h, w = out.shape[-2:]
        dense = resize_matrix(130, h, float(scale)) @ x @ resize_matrix(170, w, float(scale)).T
        assert out.is_contiguous()
        assert torch.allclose(out, dense, atol=1e-12), scale


def test_imresize_identity_constant_and_sizes():
    x = torch.rand(2, 3, 17, 19)
    assert torch.equal(imresize(x, scale=1), x)
    assert torch.allclose(imresize(x.double(), size=(17, 19)), x.double())
    constant = torch.full((1, 2, 12, 15), 0.3, dtype=torch.float64)
    for kwargs in ({"scale": 1 / 3}, {"scale": 0.5}, {"scale": 2}, {"scale": 3}, {"scale": 0.7}, {"size": (5, 31)}):
        out = imresize(constant, **kwargs)
        assert torch.allclose(out, torch.full_like(out, 0.3), atol=1e-12), kwargs
    for (h, w), scale, want in [((7, 10), 1 / 3, (3, 4)), ((7, 10), 0.5, (4, 5)), ((7, 10), 3, (21, 30)),
                                ((7, 10), 2.5, (18, 25)), ((49, 98), 1 / 49, (1, 2)), ((255, 30), 1 / 3, (85, 10))]:
        assert imresize(torch.zeros(1, 1, h, w), scale=scale).shape[-2:] == want
    assert imresize(torch.zeros(5, 8), size=(3, 11)).shape == (3, 11)


def test_imresize_down_then_up_keeps_size_and_dtypes_agree():
    x = torch.rand(1, 1, 24, 30, dtype=torch.float64)
    back = imresize(imresize(x, scale=1 / 3), scale=3)
    assert back.shape == x.shape
    assert torch.allclose(imresize(x.float(), scale=1 / 3).double(), imresize(x, scale=1 / 3), atol=1e-6)


def test_imresize_rejects_bad_arguments():
    with pytest.raises(TypeError, match="floating-point"):
        imresize(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), scale=2)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(torch.zeros(4, 4), scale=2, size=(8, 8))
    with pytest.raises(ValueError, match="exactly one"):
        imresize(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="positive"):
        imresize(torch.zeros(4, 4), scale=-1)


# ---------------------------------------------------------------- PSNR, SSIM, luma

def test_rgb_to_ycbcr_y_known_colours():
    rgb = torch.tensor([[0, 255, 255, 0, 0], [0, 255, 0, 255, 0], [0, 255, 0, 0, 255]], dtype=torch.uint8)[:, None, :]
    y = rgb_to_ycbcr_y(rgb)[0, 0]
    assert torch.allclose(y, torch.tensor([16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966], dtype=torch.float64))
    assert torch.equal(rgb_to_ycbcr_y(rgb[None].float()), rgb_to_ycbcr_y(rgb)[None])
    with pytest.raises(ValueError, match="RGB"):
        rgb_to_ycbcr_y(torch.zeros(1, 4, 4))


def test_psnr_known_cases():
    a = torch.randint(0, 250, (1, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255), abs=1e-12)  # MSE 1: 48.1308 dB
    assert psnr(a, a + 1) == pytest.approx(48.1308, abs=1e-4)
    signs = torch.where(torch.rand(20, 24, generator=torch.Generator().manual_seed(1)) < 0.5, -2.0, 2.0)
    assert psnr(a[0].double(), a[0].double() + signs) == pytest.approx(10 * math.log10(255**2 / 4))  # MSE 4
    assert psnr(a[0].double() / 255, (a[0].double() + 1) / 255, data_range=1.0) == pytest.approx(20 * math.log10(255))
    framed = a.clone()
    framed[:, 0] = 0
    framed[:, -2:] = 255
    framed[..., :2] = 7
    assert psnr(a, framed, shave=2) == math.inf and psnr(a, framed, shave=1) < 40
    with pytest.raises(ValueError, match="differ in size"):
        psnr(a, a[:, :-1])
    with pytest.raises(ValueError, match="one channel"):
        psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_ssim_known_cases():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (1, 32, 40), generator=gen).to(torch.uint8)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, a, shave=3) == pytest.approx(1.0, abs=1e-12)
    # Constant images: no variance, so only the luminance term is left.
    c1 = (0.01 * 255) ** 2
    x, y = torch.full((16, 16), 100.0), torch.full((16, 16), 110.0)
    assert ssim(x, y) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), abs=1e-12)  # 0.995476
    # Independent noise of std s on a uniform random image (variance 255^2/12 in every window): the
    # luminance term is ~1, the variances add and the covariance stays var(a), so
    # SSIM ~ (2 var + C2) / (2 var + s^2 + C2): 0.9646 for s = 20, 0.7517 for s = 60.
    c2, var = (0.03 * 255) ** 2, 255**2 / 12
    for s in (20.0, 60.0):
        noisy = a.double() + torch.randn(1, 32, 40, generator=gen, dtype=torch.float64) * s
        assert ssim(a, noisy) == pytest.approx((2 * var + c2) / (2 * var + s**2 + c2), abs=0.02)
        assert ssim(a, noisy) == pytest.approx(ssim(noisy, a), abs=1e-12)
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.zeros(10, 30), torch.zeros(10, 30))


def test_ssim_flat_against_checkerboard_by_hand():
    # A +-d checkerboard around m: every 11x11 window has mean m + (tiny alternating residue) and
    # variance ~d^2; the structure term against a flat image is C2 / (d^2 + C2).
    m, d = 128.0, 10.0
    board = m + d * (1 - 2 * ((torch.arange(40)[:, None] + torch.arange(40)[None, :]) % 2)).double()
    flat = torch.full((40, 40), m, dtype=torch.float64)
    c2 = (0.03 * 255) ** 2
    assert ssim(flat, board) == pytest.approx(c2 / (d**2 + c2), abs=2e-3)


# ---------------------------------------------------------------- models

SR_MODELS = {"srcnn_915": True, "srcnn_955": True, "fsrcnn": False, "espcn": False}


def _conv_weights(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name.endswith("weight") and p.ndim == 4)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("name", sorted(SR_MODELS))
def test_sr_model_shapes_at_odd_sizes(name, scale):
    model = create_model(name, scale=scale)
    assert model.task == "super-resolve" and model.scale == scale and model.upsampled_input is SR_MODELS[name]
    x = torch.rand(2, 1, 13, 17)
    out = model(x)
    factor = 1 if model.upsampled_input else scale
    assert out.shape == (2, 1, 13 * factor, 17 * factor)
    rgb = create_model(name, num_classes=3, in_chans=3, scale=scale)
    assert rgb(torch.rand(1, 3, 7, 9)).shape == (1, 3, 7 * factor, 9 * factor)


def test_sr_model_parameter_counts_against_the_papers():
    # The papers count weights without biases (and without PReLU slopes).
    for name, weights, total in [("srcnn_915", 8_032, 8_129), ("srcnn_955", 57_184, 57_281), ("fsrcnn", 12_464, 12_809)]:
        model = create_model(name)
        assert model_info(name).published_params == weights
        assert _conv_weights(model) == weights and count_params(model) == total
    # ESPCN's paper prints no count: 5*5*64 + 3*3*64*32 + 3*3*32*9 at x3.
    assert model_info("espcn").published_params is None
    assert _conv_weights(create_model("espcn")) == 1_600 + 18_432 + 2_592
    assert count_params(create_model("espcn", scale=4)) == 1_600 + 18_432 + 3 * 3 * 32 * 16 + 64 + 32 + 16


def test_sr_model_initialisation_and_argument_checks():
    torch.manual_seed(0)
    srcnn = create_model("srcnn_955")
    assert 0.0008 < srcnn.conv2.weight.std().item() < 0.0012 and srcnn.conv2.bias.abs().max() == 0
    fsrcnn = create_model("fsrcnn")
    assert 0.0008 < fsrcnn.deconv.weight.std().item() < 0.0012
    assert fsrcnn.body[0].weight.std().item() == pytest.approx(math.sqrt(2 / (1 + 0.25**2) / 25), rel=0.1)
    for name in SR_MODELS:
        with pytest.raises(ConfigError, match="num_classes=1"):
            create_model(name, num_classes=10, in_chans=1)
        with pytest.raises(ConfigError, match="scale"):
            create_model(name, scale=0)


def test_sr_model_trains_one_step():
    model = create_model("espcn", scale=2)
    x, y = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 16, 16)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- images and data

def test_load_sr_image_y_rgb_gray_and_broken(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    y = load_sr_image_y(save_image(tmp_path / "rgb.png", rgb))
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    expected = np.floor(16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255 + 0.5)
    assert y.dtype == torch.uint8 and y.shape == (1, 9, 11) and np.array_equal(y[0].numpy(), expected)
    gray = rgb[..., 0]
    assert np.array_equal(load_sr_image_y(save_image(tmp_path / "gray.png", gray))[0].numpy(), gray)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png"):
        load_sr_image_y(tmp_path / "broken.png")


def test_modcrop_and_patches():
    img = torch.arange(11 * 14, dtype=torch.uint8).view(1, 11, 14)
    assert modcrop(img, 3).shape == (1, 9, 12) and torch.equal(modcrop(img, 3), img[:, :9, :12])
    assert modcrop(img, 1).shape == img.shape
    patches = extract_patches(modcrop(img, 3), 6, 3)  # rows at 0, 3; columns at 0, 3, 6
    assert patches.shape == (6, 1, 6, 6)
    assert torch.equal(patches[4], img[:, 3:9, 3:9]) and torch.equal(patches[2], img[:, 0:6, 6:12])


def _make_sr_folder(root, train_sizes=((50, 61), (40, 40), (10, 10)), test_sets=None):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(train_sizes):
        save_image(root / "train-T91" / f"t{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for name, sizes in (test_sets or {"Set5": [(25, 31), (19, 20)]}).items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            save_image(root / name / f"img{i}.png", rng.integers(0, 256, (h, w), dtype=np.uint8))


def test_load_superres_patches_and_test_sets(tmp_path):
    _make_sr_folder(tmp_path)
    data = load_superres(tmp_path, 3, patch_size=12, stride=6)
    # 50x61 -> 48x60: 7 x 9 patches; 40x40 -> 39x39: 5 x 5; 10x10 -> 9x9: none
    assert data.train.images.shape == (7 * 9 + 5 * 5, 1, 12, 12) and data.train.images.dtype == torch.uint8
    assert torch.equal(data.train.labels, torch.zeros(88, dtype=torch.long))
    assert list(data.test_sets) == ["Set5"] and [tuple(t.shape) for t in data.test_sets["Set5"]] == [(1, 24, 30), (1, 18, 18)]
    assert any("smaller than 12x12" in note for note in data.notes)
    assert any("Set14" in note for note in data.notes)
    first = modcrop(load_sr_image_y(tmp_path / "train-T91" / "t0.png"), 3)
    assert torch.equal(data.train.images[1], first[:, 0:12, 6:18])
    info = data.describe()
    assert info["scale"] == 3 and info["train"] == 88 and info["test_sets"] == {"Set5": 2} and info["patch_size"] == 12
    assert (data.channels, data.mean, data.std, data.num_classes) == (1, (0.0,), (1.0,), 1)
    assert load_superres(tmp_path, 2, patch_size=12, stride=12).train.images.shape[0] == 4 * 5 + 3 * 3


def test_load_superres_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_superres(tmp_path / "nowhere", 3)
    _make_sr_folder(tmp_path)
    with pytest.raises(ConfigError, match="multiple of the scale"):
        load_superres(tmp_path, 3, patch_size=16)
    with pytest.raises(DataError, match="none of the test folders"):
        load_superres(tmp_path, 3, patch_size=12, test_dirs=("Set14", "BSD100"))
    with pytest.raises(DataError, match="training folder not found"):
        load_superres(tmp_path, 3, train_dir="T91")
    with pytest.raises(DataError, match="no 96x96 training patch"):
        load_superres(tmp_path, 3, patch_size=96)
    (tmp_path / "Set14").mkdir()
    with pytest.raises(DataError, match="Set14 holds no images"):
        load_superres(tmp_path, 3, patch_size=12)
    with pytest.raises(DataError, match="test folder not found"):
        load_sr_folder(tmp_path / "Urban100", 3)
    assert [tuple(t.shape) for t in load_sr_folder(tmp_path / "Set5", 4)] == [(1, 24, 28), (1, 16, 20)]


# ---------------------------------------------------------------- loader

def _patch_split(n: int = 10, size: int = 12) -> Split:
    images = torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    return Split(images, torch.zeros(n, dtype=torch.long))


def _batches(loader, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = []
    for x, y in loader.iter_from(start):
        out.append((x, y, loader.last_indices.clone()))
    return out


def test_dihedral_gives_the_eight_symmetries():
    patch = torch.arange(9, dtype=torch.uint8).view(1, 1, 3, 3).expand(8, 1, 3, 3)
    out = dihedral(patch, torch.arange(8))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8
    assert torch.equal(out[0], patch[0]) and torch.equal(out[1], patch[0].flip(-1))
    assert torch.equal(out[2], torch.rot90(patch[0], 1, (-2, -1)))


def test_loader_deterministic_per_seed_and_epoch_and_resumable():
    split = _patch_split()
    make = lambda: SuperResLoader(split, 3, scale=3, shuffle=True, seed=5)  # noqa: E731
    a, b = make(), make()
    a.set_epoch(2)
    b.set_epoch(2)
    full, again = _batches(a), _batches(b)
    assert len(a) == len(full) == 4
    for (x1, y1, i1), (x2, y2, i2) in zip(full, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    resumed = _batches(b, start=2)
    assert len(resumed) == 2
    for (x1, y1, i1), (x2, y2, i2) in zip(full[2:], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    b.set_epoch(3)
    other = _batches(b)
    assert not all(torch.equal(i1, i2) and torch.equal(y1, y2) for (_, y1, i1), (_, y2, i2) in zip(full, other))


def test_loader_targets_are_augmented_patches_and_inputs_their_downscale():
    split = _patch_split()
    loader = SuperResLoader(split, 4, scale=3, shuffle=True, seed=1)
    seen_codes = set()
    for x, y in loader:
        assert x.dtype == y.dtype == torch.float32 and y.shape == (len(loader.last_indices), 1, 12, 12)
        assert x.shape == (y.shape[0], 1, 4, 4) and torch.equal(x, imresize(y, 1 / 3))
        for target, index in zip(y, loader.last_indices):
            original = split.images[index]
            variants = dihedral(original.expand(8, 1, 12, 12), torch.arange(8))
            match = [c for c in range(8) if torch.equal(to_uint8(target), variants[c])]
            assert match
            seen_codes.add(match[0])
    assert len(seen_codes) > 1
    plain = SuperResLoader(split, 4, scale=3, augment=False, upsampled_input=True)
    x, y = next(iter(plain))
    assert torch.equal(y, split.images[:4].float() / 255)
    assert x.shape == y.shape and torch.allclose(x, imresize(imresize(y, 1 / 3), 3), atol=1e-6)


def test_loader_shards_like_batchloader_and_checks_patches():
    split = _patch_split(12)
    whole = SuperResLoader(split, 4, scale=2, shuffle=True, seed=3, world_size=1)
    ranks = [SuperResLoader(split, 2, scale=2, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    for (_, y, idx), *parts in zip(_batches(whole), *map(_batches, ranks)):
        assert sorted(torch.cat([p[2] for p in parts]).tolist()) == sorted(idx.tolist())
        by_index = {int(i): t for i, t in zip(idx, y)}
        for _, yp, ip in parts:
            for i, t in zip(ip, yp):
                assert torch.equal(by_index[int(i)], t)
    with pytest.raises(ConfigError, match="divisible by the scale"):
        SuperResLoader(split, 4, scale=5)


# ---------------------------------------------------------------- evaluation and upscaling

class Identity(nn.Module):
    """Returns the bicubic image it is given: an SRCNN that learned nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x


class BicubicUp(nn.Module):
    """Upscales the LR image by bicubic: an FSRCNN/ESPCN that learned nothing."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return imresize(x, self.scale)


def _smooth(channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A uint8 (channels, h, w) image: random values on a coarse grid, bicubic-upscaled by 4."""
    low = torch.rand(1, channels, math.ceil(h / 4), math.ceil(w / 4), generator=torch.Generator().manual_seed(seed),
                     dtype=torch.float64)
    return to_uint8(imresize(low, 4).clamp(0, 1))[0, :, :h, :w]


def test_evaluate_identity_models_equal_bicubic():
    images = [_smooth(1, 32 + i, 36, seed=i) for i in range(3)]
    model = Identity().train()
    for scale in (2, 3, 4):
        result = evaluate_superres(model, images, scale, upsampled_input=True)
        assert result["psnr"] == result["bicubic_psnr"] and result["ssim"] == result["bicubic_ssim"]
        assert result["images"] == 3 and len(result["per_image"]) == 3 and 20 < result["psnr"] < 60
        lr = evaluate_superres(BicubicUp(scale), images, scale, upsampled_input=False)
        assert lr["psnr"] == pytest.approx(result["bicubic_psnr"], abs=1e-9)
    assert model.training  # mode restored
    alone = evaluate_superres(None, images, 4, upsampled_input=True)  # bicubic alone, at the last scale
    assert alone["psnr"] == alone["bicubic_psnr"] == result["bicubic_psnr"] and alone["images"] == 3
    with pytest.raises(ValueError, match="upsampled_input"):
        evaluate_superres(Identity(), images, 3, upsampled_input=False)


def test_evaluate_clamps_the_output_before_rounding():
    hr = _smooth(1, 30, 33)

    class Bright(nn.Module):
        def forward(self, x):
            return torch.full_like(x, 10.0)  # clamped to 1, i.e. 255 everywhere

    result = evaluate_superres(Bright(), [hr], 3, upsampled_input=True)
    assert result["psnr"] == pytest.approx(psnr(hr, torch.full_like(hr, 255), shave=3))
    assert result["ssim"] == pytest.approx(ssim(hr, torch.full_like(hr, 255), shave=3))


def test_ycbcr_round_trip_and_upscale_rgb():
    rgb = torch.randint(0, 256, (3, 5, 6), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    assert torch.allclose(ycbcr_to_rgb(rgb_to_ycbcr(rgb)), rgb.double(), atol=1e-9)
    assert torch.allclose(rgb_to_ycbcr(rgb)[0], rgb_to_ycbcr_y(rgb)[0])
    # A bicubic "model" on Y plus bicubic Cb/Cr is bicubic RGB (the colour transform is linear), up to rounding.
    smooth = _smooth(3, 32, 36)
    out = upscale_rgb(BicubicUp(3), smooth, 3, upsampled_input=False)
    assert out.dtype == torch.uint8 and out.shape == (3, 96, 108)
    direct = to_uint8(imresize(smooth.double()[None] / 255, 3))[0]
    assert (out.int() - direct.int()).abs().max() <= 1
    assert torch.equal(upscale_rgb(Identity(), smooth, 3, upsampled_input=True), out)
    gray = upscale_rgb(BicubicUp(2), smooth[:1], 2, upsampled_input=False)
    assert gray.shape == (1, 64, 72) and torch.equal(gray, to_uint8(imresize(smooth[:1].double()[None] / 255, 2))[0])


# ---------------------------------------------------------------- the published bicubic baseline

@pytest.fixture(scope="session")
def sr_root(tmp_path_factory):
    """Set5, Set14 and T91 from ../shared/datasets/sr-benchmarks.tar.gz, extracted into a temporary folder."""
    if not SR_TAR.is_file():
        pytest.skip(f"{SR_TAR} is absent: no super-resolution benchmark images to test with")
    target = tmp_path_factory.mktemp("sr-benchmarks")
    wanted = ("sr/Set5/", "sr/Set14/", "sr/train-T91/")
    with tarfile.open(SR_TAR, "r|gz") as archive:
        for member in archive:
            if member.name.startswith(wanted):
                archive.extract(member, target, filter="data")
    return target / "sr"


@pytest.mark.shared
@pytest.mark.slow
def test_bicubic_x3_baseline_matches_the_papers(sr_root):
    data = load_superres(sr_root, 3, test_dirs=("Set5", "Set14"))
    assert len(data.train) == 19_118 and data.describe()["test_sets"] == {"Set5": 5, "Set14": 14}
    # SRCNN (TPAMI 2016), bicubic x3: Set5 30.39 dB / 0.8682, Set14 27.54 dB / 0.7736 (VDSR prints 27.55 / 0.7742).
    set5 = evaluate_superres(Identity(), data.test_sets["Set5"], 3, upsampled_input=True)
    set14 = evaluate_superres(Identity(), data.test_sets["Set14"], 3, upsampled_input=True)
    assert set5["bicubic_psnr"] == pytest.approx(30.39, abs=0.05) and set5["bicubic_ssim"] == pytest.approx(0.8682, abs=1e-3)
    assert set14["bicubic_psnr"] == pytest.approx(27.55, abs=0.05) and set14["bicubic_ssim"] == pytest.approx(0.7736, abs=1e-3)
    assert set5["images"] == 5 and set14["images"] == 14


@pytest.mark.shared
@pytest.mark.slow
def test_srcnn_patch_count_on_t91(sr_root):
    # SRCNN's 33x33 sub-images at stride 14 from T91 at x3: 21,884 patches.
    assert len(load_superres(sr_root, 3, patch_size=33, stride=14, test_dirs=("Set5",)).train) == 21_884
