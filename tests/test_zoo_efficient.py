"""The efficient families: MobileNetV1/V2/V3, EfficientNet-B0..B7, RegNetX/Y, ConvNeXt.

Every model: exact published parameter count and MACs within 3% (both on the meta device at
the registered input size), forward and backward at a small non-default size with the requested
``num_classes`` and ``in_chans``, and the ``forward_features``/``forward_head`` split.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convforge.layers import DclsConv2d, DropPath
from convforge.measure import count_macs, count_params
from convforge.models import Classifier, create_model, list_models, model_info
from convforge.models.efficientnet import round_filters, round_repeats
from convforge.models.regnet import generate_stages

MODELS = (
    ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]
    + [f"efficientnet_b{i}" for i in range(8)]
    + [f"regnet{kind}_{size}" for kind in "xy" for size in ("400mf", "800mf", "1_6gf", "3_2gf")]
    + [f"convnext_{size}" for size in ("tiny", "small", "base", "large")]
)
# Large enough that a 64x64 backward pass or a CPU build is noticeably slow: one 32x32 pass instead.
BIG = {"efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "convnext_small", "convnext_base", "convnext_large"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_all_models_registered():
    assert set(MODELS) <= set(list_models())
    for name in MODELS:
        info = model_info(name)
        assert info.paper and info.year and info.published_params and info.published_macs and info.published_top1


@pytest.mark.parametrize("name", MODELS)
def test_params_exact_and_macs_within_3_percent(name):
    info = model_info(name)
    with torch.device("meta"):
        model = create_model(name)
    assert count_params(model) == info.published_params
    macs = count_macs(model, info.input_size)
    assert abs(macs - info.published_macs) / info.published_macs < 0.03, (macs, info.published_macs)


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_small_input(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=2)
    assert isinstance(model, Classifier)
    size = (32, 40) if name in BIG else (64, 48)  # non-square, not the default size
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    if name in BIG:
        # the backward pass still runs through every layer to the stem, without ~1 GB of weight gradients
        model.requires_grad_(False)
        first_conv.requires_grad_(True)
    x = torch.randn(2, 2, *size)
    features = model.forward_features(x)
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    logits = model.forward_head(features)
    assert logits.shape == (2, 7)
    logits.pow(2).sum().backward()
    assert first_conv.in_channels == 2
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "regnetx_400mf", "convnext_tiny"])
def test_forward_is_features_then_head(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(model(x), model.forward_head(model.forward_features(x)))
        assert model(x).shape == (1, 1000)


def _randomise_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.data.copy_(torch.randn(c, generator=gen) * 0.5)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "regnety_400mf"])
def test_fuse_folds_every_batchnorm_and_keeps_outputs(name):
    torch.manual_seed(0)
    model = create_model(name)
    _randomise_bn(model)
    model.eval()
    n_params = count_params(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, logits = model.forward_features(x), model(x)
        assert model.fuse() is model
        fused_features, fused_logits = model.forward_features(x), model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert count_params(model) < n_params
    for ref, out in ((features, fused_features), (logits, fused_logits)):
        scale = max(1.0, ref.abs().max().item())
        assert (ref - out).abs().max().item() <= 1e-5 * scale


# ---------------------------------------------------------------- family specifics


def test_efficientnet_compound_scaling():
    assert [round_filters(c, 2.0) for c in (32, 16, 24, 40, 80, 112, 192, 320)] == [64, 32, 48, 80, 160, 224, 384, 640]
    assert [round_filters(c, 1.1) for c in (32, 16, 24, 40)] == [32, 16, 24, 48]
    assert [round_repeats(n, 3.1) for n in (1, 2, 2, 3, 3, 4, 1)] == [4, 7, 7, 10, 10, 13, 4]
    with torch.device("meta"):
        b0, b7 = create_model("efficientnet_b0"), create_model("efficientnet_b7")
    assert b0.num_features == 1280 and b7.num_features == 2560
    assert sum(len(stage) for stage in b7.features[1:-1]) == 55
    assert [model_info(f"efficientnet_b{i}").input_size[-1] for i in range(8)] == [224, 240, 288, 300, 380, 456, 528, 600]


def test_efficientnet_and_convnext_drop_path_rates():
    with torch.device("meta"):
        eff = create_model("efficientnet_b0", drop_path_rate=0.3)
        cnx = create_model("convnext_tiny", drop_path_rate=0.25)
        default = create_model("convnext_tiny")
    eff_rates = [m.rate for m in eff.modules() if isinstance(m, DropPath)]
    assert eff_rates[0] == 0.0 and eff_rates == sorted(eff_rates) and 0.27 < eff_rates[-1] < 0.3
    cnx_rates = [m.rate for m in cnx.modules() if isinstance(m, DropPath)]
    assert len(cnx_rates) == 18 and cnx_rates[0] == 0.0 and cnx_rates[-1] == pytest.approx(0.25)
    assert max(m.rate for m in default.modules() if isinstance(m, DropPath)) == pytest.approx(0.1)
    dropped = create_model("mobilenet_v2", dropout=0.5)
    assert dropped.classifier[0].p == 0.5


def test_regnet_generator():
    # the generator reproduces the published stage layouts (torchvision's group-width rounding)
    assert generate_stages(22, 24, 24.48, 2.54, 16) == [(32, 1, 16), (64, 2, 16), (160, 7, 16), (400, 12, 16)]
    assert generate_stages(16, 48, 27.89, 2.09, 8) == [(48, 1, 8), (104, 3, 8), (208, 6, 8), (440, 6, 8)]
    stages = generate_stages(21, 80, 42.63, 2.66, 24)
    assert sum(s.depth for s in stages) == 21 and all(s.width % s.group_width == 0 for s in stages)
    with torch.device("meta"):
        x, y = create_model("regnetx_400mf"), create_model("regnety_400mf")
    assert not any(n.endswith(".se") for n, _ in x.named_modules())
    se = [m for n, m in y.named_modules() if n.endswith(".se")]
    assert len(se) == 16
    assert se[0].fc1.out_channels == 8  # a quarter of the 32-channel stem output feeding the first block
    with pytest.raises(ValueError):
        generate_stages(10, 30, 10.0, 2.0, 8)


def test_convnext_layer_scale_and_torchvision_names():
    with torch.device("meta"):
        model = create_model("convnext_tiny")
    state = model.state_dict()
    for key in ("features.0.0.weight", "features.0.1.weight", "features.1.0.block.0.weight",
                "features.1.0.block.3.weight", "features.1.0.layer_scale", "features.2.1.weight",
                "classifier.0.weight", "classifier.2.weight"):
        assert key in state
    assert model.features[1][0].layer_scale.shape == (96, 1, 1)
    real = create_model("convnext_tiny", num_classes=3, drop_path_rate=0.0)
    assert torch.allclose(real.features[3][0].layer_scale, torch.full((192, 1, 1), 1e-6))


def test_convnext_with_dcls_depthwise_convs():
    torch.manual_seed(0)
    model = create_model("convnext_tiny", num_classes=5, dcls=True)
    dcls = [m for m in model.modules() if isinstance(m, DclsConv2d)]
    assert len(dcls) == 18 and dcls[0].dilated_kernel_size == 17
    out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 5)
    out.sum().backward()
    assert dcls[-1].P.grad is not None and dcls[-1].P.grad.abs().sum() > 0


def test_torchvision_parameter_names():
    with torch.device("meta"):
        names = {n: set(create_model(n).state_dict()) for n in ("mobilenet_v2", "mobilenet_v3_large",
                                                                 "efficientnet_b0", "regnety_400mf")}
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.2.conv.2.weight",
            "features.18.1.running_var", "classifier.1.weight"} <= names["mobilenet_v2"]
    assert {"features.4.block.2.fc1.weight", "features.4.block.3.0.weight", "classifier.0.weight",
            "classifier.3.bias"} <= names["mobilenet_v3_large"]
    assert {"features.1.0.block.1.fc2.bias", "features.2.0.block.0.0.weight", "features.8.1.weight",
            "classifier.1.weight"} <= names["efficientnet_b0"]
    assert {"stem.0.weight", "trunk_output.block1.block1-0.proj.0.weight",
            "trunk_output.block2.block2-1.f.se.fc1.weight", "trunk_output.block4.block4-5.f.c.1.bias",
            "fc.weight"} <= names["regnety_400mf"]
