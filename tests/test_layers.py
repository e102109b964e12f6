"""The special layers: BlurPool, DCLS, SPD-Conv, the re-parameterised large kernel, make_divisible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convforge.layers import (
    BlurPool,
    DclsConv2d,
    ReparamLargeKernelConv,
    SpaceToDepth,
    SPDConv,
    binomial_filter,
    make_divisible,
    space_to_depth,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests are many tiny ops: one thread avoids contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- make_divisible


@pytest.mark.parametrize(
    "value,divisor,expected",
    [(32, 8, 32), (18, 8, 24), (17.6, 8, 16), (3, 8, 8), (120, 8, 120), (392, 16, 400), (35.2, 8, 32), (72, 24, 72)],
)
def test_make_divisible(value, divisor, expected):
    out = make_divisible(value, divisor)
    assert out == expected
    assert out % divisor == 0 and out >= 0.9 * value


# ---------------------------------------------------------------- BlurPool


@pytest.mark.parametrize("size", range(1, 8))
def test_binomial_filter_is_normalised_and_symmetric(size):
    kernel = binomial_filter(size)
    assert kernel.shape == (size, size)
    assert torch.allclose(kernel.sum(), torch.tensor(1.0))
    assert torch.equal(kernel, kernel.T) and torch.equal(kernel, kernel.flip(0))


def test_binomial_filter_rejects_bad_sizes():
    for size in (0, 8):
        with pytest.raises(ValueError, match="1 to 7"):
            binomial_filter(size)


@pytest.mark.parametrize("size", range(1, 8))
@pytest.mark.parametrize("hw", [(16, 16), (15, 9)])
def test_blurpool_shape_and_constant_input(size, hw):
    pool = BlurPool(3, filter_size=size)
    x = torch.full((2, 3, *hw), 0.7)
    out = pool(x)
    assert out.shape == (2, 3, (hw[0] + 1) // 2, (hw[1] + 1) // 2)
    assert torch.allclose(out, torch.full_like(out, 0.7))  # a low-pass filter with reflect padding keeps DC
    assert list(pool.parameters()) == []  # the filter is fixed


def test_blurpool_is_per_channel():
    x = torch.zeros(1, 3, 8, 8)
    x[:, 1, 4, 4] = 1.0
    out = BlurPool(3, filter_size=3)(x)
    assert out[:, 1].sum() > 0 and out[:, 0].abs().sum() == 0 and out[:, 2].abs().sum() == 0


def _change_under_shift(f, big: torch.Tensor, axis: int, shift: int, size: int = 32) -> float:
    """Relative change of ``f``'s output (border pixels left out) when the input window moves by ``shift``."""
    a = big[..., :size, :size]
    b = big[..., shift : size + shift, :size] if axis == 0 else big[..., :size, shift : size + shift]
    fa, fb = f(a)[..., 2:-2, 2:-2], f(b)[..., 2:-2, 2:-2]
    return ((fa - fb).norm() / fa.norm()).item()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), filter_size=st.integers(2, 7), axis=st.sampled_from([0, 1]))
def test_blurpool_is_closer_to_shift_invariant_than_strided_ops(seed, filter_size, axis):
    """Zhang 2019: moving the input by one pixel changes the blurred-then-subsampled output less than it
    changes the output of plain subsampling, of a stride-2 max pool, or of a stride-2 convolution."""
    gen = torch.Generator().manual_seed(seed)
    channels = 4
    big = torch.randn(1, channels, 40, 40, generator=gen)
    weight = torch.randn(channels, channels, 3, 3, generator=gen)
    blur = BlurPool(channels, filter_size=filter_size)
    pairs = [
        (blur, lambda x: x[..., ::2, ::2]),
        (lambda x: blur(F.max_pool2d(x, 2, 1)), lambda x: F.max_pool2d(x, 2, 2)),  # MaxBlurPool vs MaxPool
        (lambda x: blur(F.conv2d(x, weight, padding=1)), lambda x: F.conv2d(x, weight, stride=2, padding=1)),
    ]
    for antialiased, strided in pairs:
        assert _change_under_shift(antialiased, big, axis, 1) < 0.9 * _change_under_shift(strided, big, axis, 1)


@pytest.mark.parametrize("filter_size", [3, 4, 5])
def test_blurpool_is_equivariant_to_even_shifts(filter_size):
    big = torch.randn(1, 2, 36, 36, generator=torch.Generator().manual_seed(0))
    pool = BlurPool(2, filter_size=filter_size)
    a, b = pool(big[..., :32, :32]), pool(big[..., 2:34, :32])
    # a 2-pixel input shift is a 1-pixel output shift (away from the padded border)
    assert torch.allclose(a[..., 3:-3, 3:-3], b[..., 2:-4, 3:-3], atol=1e-6)


def test_blurpool_larger_filters_are_more_shift_invariant():
    big = torch.randn(1, 8, 40, 40, generator=torch.Generator().manual_seed(1))
    changes = [_change_under_shift(BlurPool(8, filter_size=k), big, 1, 1) for k in (1, 3, 5, 7)]
    assert changes == sorted(changes, reverse=True)


# ---------------------------------------------------------------- DCLS


def test_dcls_is_a_depthwise_drop_in():
    layer = DclsConv2d(6, kernel_count=5, dilated_kernel_size=9)
    x = torch.randn(2, 6, 17, 13)
    out = layer(x)
    assert out.shape == nn.Conv2d(6, 6, 9, padding=4, groups=6)(x).shape == (2, 6, 17, 13)
    assert layer.dense_weight().shape == (6, 1, 9, 9)
    assert torch.allclose(out, F.conv2d(x, layer.dense_weight(), layer.bias, padding=4, groups=6), atol=1e-6)
    assert DclsConv2d(6, 5, 9, stride=2)(x).shape == (2, 6, 9, 7)
    assert {name for name, _ in layer.named_parameters()} == {"weight", "P", "bias"}
    assert set(dict(DclsConv2d(6, 5, 9, interpolation="gaussian").named_parameters())) == {"weight", "P", "SIG", "bias"}


def test_dcls_positions_initialised_inside_the_kernel():
    layer = DclsConv2d(64, kernel_count=34, dilated_kernel_size=17)
    assert layer.P.abs().max() <= 8
    assert layer.P.std() > 0.1


def test_dcls_equals_dilated_conv_on_a_regular_grid():
    """Weights placed on the grid {-2, 0, 2}^2 reproduce a 3x3 convolution with dilation 2."""
    channels = 3
    layer = DclsConv2d(channels, kernel_count=9, dilated_kernel_size=5)
    rows, cols = torch.meshgrid(torch.tensor([-2.0, 0.0, 2.0]), torch.tensor([-2.0, 0.0, 2.0]), indexing="ij")
    with torch.no_grad():
        layer.P[0] = rows.reshape(1, 1, 9).expand(channels, 1, 9)
        layer.P[1] = cols.reshape(1, 1, 9).expand(channels, 1, 9)
    conv = nn.Conv2d(channels, channels, 3, padding=2, dilation=2, groups=channels)
    with torch.no_grad():
        conv.weight.copy_(layer.weight.reshape(channels, 1, 3, 3))
        conv.bias.copy_(layer.bias)
    x = torch.randn(2, channels, 12, 12)
    assert torch.allclose(layer(x), conv(x), atol=1e-6)


def test_dcls_bilinear_interpolation_splits_a_weight_between_neighbours():
    layer = DclsConv2d(1, kernel_count=1, dilated_kernel_size=5, bias=False)
    with torch.no_grad():
        layer.weight.fill_(2.0)
        layer.P.copy_(torch.tensor([0.25, -1.0]).reshape(2, 1, 1, 1))  # row 2.25, column 1 (of 0..4)
    kernel = layer.dense_weight()[0, 0]
    expected = torch.zeros(5, 5)
    expected[2, 1], expected[3, 1] = 1.5, 0.5
    assert torch.allclose(kernel, expected)


@pytest.mark.parametrize("interpolation", ["bilinear", "gaussian"])
def test_dcls_gradients_reach_the_positions(interpolation):
    layer = DclsConv2d(4, kernel_count=6, dilated_kernel_size=7, interpolation=interpolation)
    with torch.no_grad():
        layer.P[:, 0, 0, 0] = torch.tensor([1.0, -2.0])  # an exactly integer position still gets a gradient
    x = torch.randn(2, 4, 10, 10)
    (layer(x) * torch.randn(2, 4, 10, 10)).sum().backward()
    assert layer.P.grad is not None and torch.isfinite(layer.P.grad).all()
    assert (layer.P.grad.abs() > 0).float().mean() > 0.9
    assert layer.P.grad[:, 0, 0, 0].abs().min() > 0
    assert layer.weight.grad.abs().sum() > 0
    if interpolation == "gaussian":
        assert layer.SIG.grad.abs().sum() > 0
    # one optimiser step moves the positions, and clamp_parameters keeps them in the kernel
    with torch.no_grad():
        layer.P -= 100 * layer.P.grad
    layer.clamp_parameters()
    assert layer.P.abs().max() <= 3


def test_dcls_gaussian_footprint_has_unit_mass():
    layer = DclsConv2d(2, kernel_count=3, dilated_kernel_size=9, interpolation="gaussian", bias=False)
    with torch.no_grad():
        layer.P.zero_()
    assert torch.allclose(layer.dense_weight().sum((1, 2, 3)), layer.weight.sum((1, 2)), atol=1e-5)


def test_dcls_rejects_bad_arguments():
    with pytest.raises(ValueError, match="odd"):
        DclsConv2d(4, 3, 6)
    with pytest.raises(ValueError, match="interpolation"):
        DclsConv2d(4, 3, 7, interpolation="nearest")


# ---------------------------------------------------------------- SPD-Conv


def test_space_to_depth_layout_and_losslessness():
    x = torch.randn(2, 3, 8, 6)
    y = space_to_depth(x, 2)
    assert y.shape == (2, 12, 4, 3)
    # the paper's order: x[::2, ::2], x[1::2, ::2], x[::2, 1::2], x[1::2, 1::2]
    assert torch.equal(y[:, 0:3], x[..., ::2, ::2])
    assert torch.equal(y[:, 3:6], x[..., 1::2, ::2])
    assert torch.equal(y[:, 6:9], x[..., ::2, 1::2])
    assert torch.equal(y[:, 9:12], x[..., 1::2, 1::2])
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)  # a permutation of the pixels
    assert space_to_depth(torch.randn(1, 2, 9, 12), 3).shape == (1, 18, 3, 4)
    assert space_to_depth(torch.randn(1, 2, 7, 5), 2).shape == (1, 8, 4, 3)  # odd sizes are padded


def test_spd_conv_output_shape_and_gradient():
    layer = SPDConv(16, 32)
    assert isinstance(layer[0], SpaceToDepth)
    conv = layer[1][0]
    assert conv.in_channels == 64 and conv.stride == (1, 1)
    x = torch.randn(2, 16, 20, 14, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 32, 10, 7)
    assert out.shape == nn.Conv2d(16, 32, 3, stride=2, padding=1)(x).shape  # a drop-in for a strided conv
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    assert SPDConv(3, 8, kernel_size=1, scale=4)(torch.randn(1, 3, 32, 32)).shape == (1, 8, 8, 8)


# ---------------------------------------------------------------- re-parameterised large kernel


def _randomise_bn(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=gen))
            bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
            bn.weight.data.copy_(torch.randn(c, generator=gen))
            bn.bias.data.copy_(torch.randn(c, generator=gen))


@pytest.mark.parametrize("kernel_size,small_kernel,stride", [(13, 5, 1), (31, 5, 1), (7, 3, 2), (9, None, 1), (5, 5, 1)])
def test_reparam_large_kernel_equivalence(kernel_size, small_kernel, stride):
    torch.manual_seed(0)
    layer = ReparamLargeKernelConv(8, kernel_size, small_kernel=small_kernel, stride=stride)
    _randomise_bn(layer, seed=kernel_size)
    layer.eval()
    x = torch.randn(2, 8, 24, 20)
    with torch.no_grad():
        before = layer(x)
        layer.reparameterize()
        after = layer(x)
    assert after.shape == before.shape == (2, 8, -(-24 // stride), -(-20 // stride))
    scale = max(1.0, before.abs().max().item())
    assert (before - after).abs().max().item() <= 1e-5 * scale
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"lkb_reparam.weight", "lkb_reparam.bias"}
    assert layer.lkb_reparam.weight.shape == (8, 1, kernel_size, kernel_size)
    assert layer.reparameterize() is layer  # idempotent


def test_reparam_large_kernel_trains_both_branches():
    layer = ReparamLargeKernelConv(4, 11, small_kernel=3)
    layer(torch.randn(2, 4, 16, 16)).sum().backward()
    assert layer.lkb_origin.conv.weight.grad.abs().sum() > 0
    assert layer.small_conv.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        ReparamLargeKernelConv(4, 3, small_kernel=5)
    with pytest.raises(ValueError):
        ReparamLargeKernelConv(4, 8)
