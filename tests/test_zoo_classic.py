"""The classic model families: VGG, ResNet and relatives, DenseNet, Inception-v3, and the CIFAR nets.

Every registered model of these families is checked against its published parameter count
(exactly) and MACs (within 3%) on the meta device, runs at a small resolution (forward and
backward; forward only for the largest), honours ``num_classes``/``in_chans``, exposes
``num_features`` through ``forward_head(pre_logits=True)``; BatchNorm folding is checked for a
representative set.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convforge.measure import count_macs, count_params
from convforge.models import Classifier, create_model, list_models, model_info

FAMILIES = {"vgg", "resnet", "densenet", "inception", "nin", "allconv", "preact_resnet", "wide_resnet_cifar"}
MODELS = [name for name in list_models() if model_info(name).family in FAMILIES]

# Models whose papers (and official implementations) publish no MAC figure to check against.
NO_PUBLISHED_MACS = {"nin", "allconv", "preact_resnet18", "wrn16_4", "wrn28_10", "densenet_bc_100"}

# Too large to train a step on a shared CPU in the suite's budget: one small forward instead.
FORWARD_ONLY_ABOVE = 40_000_000

# The BN-folding equivalence set: plain and pre-activation (DenseNet, PreAct, WRN) networks,
# split branches (Res2Net), BN eps 1e-3 (Inception), the CIFAR ResNet.
FUSE_MODELS = ["resnet20", "resnet50", "resnet50d", "res2net50_26w_4s", "vgg11_bn", "densenet121",
               "densenet_bc_100", "inception_v3", "preact_resnet18", "wrn16_4"]


def small_size(name: str) -> int:
    """A small input side the model accepts: 75 for Inception-v3, 32 for the other ImageNet models
    (five halvings), 16 for the CIFAR ones."""
    if model_info(name).family == "inception":
        return 75
    return 16 if model_info(name).input_size[1] <= 32 else 32


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors on a shared 2-core machine: one thread is faster than two spinning ones
    (conftest restores the thread count after each test)."""
    torch.set_num_threads(1)


def test_every_family_is_registered():
    assert {model_info(n).family for n in MODELS} == FAMILIES
    expected = {
        "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50d",
        "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
        "seresnet50", "res2net50_26w_4s",
        "densenet121", "densenet161", "densenet169", "densenet201", "densenet_bc_100",
        "inception_v3", "nin", "allconv", "preact_resnet18", "wrn16_4", "wrn28_10",
    }
    assert set(MODELS) == expected
    assert NO_PUBLISHED_MACS <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_published_params_and_macs(name):
    info = model_info(name)
    assert info.paper and info.year and info.description
    with torch.device("meta"):
        model = create_model(name)
    assert isinstance(model, Classifier)
    assert count_params(model) == info.published_params
    if name in NO_PUBLISHED_MACS:
        assert info.published_macs is None
    else:
        macs = count_macs(model, info.input_size)
        assert abs(macs / info.published_macs - 1) < 0.03, (macs, info.published_macs)


@pytest.mark.parametrize("name", MODELS)
def test_num_classes_in_chans_and_head_on_meta(name):
    info = model_info(name)
    _, height, width = info.input_size
    with torch.device("meta"):
        model = create_model(name, num_classes=7, in_chans=1).eval()
        x = torch.empty(2, 1, height, width)
        assert model(x).shape == (2, 7)
        features = model.forward_features(x)
        assert features.dim() == 4
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        assert model.forward_head(features).shape == (2, 7)


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_small(name):
    torch.manual_seed(0)
    info = model_info(name)
    size = small_size(name)
    model = create_model(name, num_classes=3)
    x = torch.randn(2, 3, size, size)
    if info.published_params > FORWARD_ONLY_ABOVE:
        with torch.no_grad():
            out = model.eval()(x)
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        return
    out = model.train()(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 2])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def _randomise_batchnorm(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", FUSE_MODELS)
def test_fuse_batchnorm_is_equivalent(name):
    torch.manual_seed(0)
    size = small_size(name)
    model = create_model(name, num_classes=5)
    _randomise_batchnorm(model)
    x = torch.randn(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        y0 = model(x)
        before = _count_bn(model)
        assert model.fuse() is model
        y1 = model(x)
    after = _count_bn(model)
    # every BN that follows a convolution is gone; pre-activation BNs (after a concat or a sum) stay
    assert after < before
    if name.startswith(("resnet", "res2net", "vgg", "inception")):
        assert after == 0
    scale = max(1.0, y0.abs().max().item())
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5 * scale)


def test_pre_activation_bns_stay_and_others_fold():
    model = create_model("densenet_bc_100").eval()
    model.fuse()
    layer = model.features.denseblock1.denselayer1
    assert isinstance(layer.norm1, nn.BatchNorm2d)  # after the concatenation: cannot fold
    assert isinstance(layer.norm2, nn.Identity) and layer.conv1.bias is not None  # after conv1: folded


# --- family-specific options ---------------------------------------------------------------------


def test_resnet_d_options_match_resnet50d():
    with torch.device("meta"):
        tweaked = create_model("resnet50", deep_stem=True, avg_down=True)
        reference = create_model("resnet50d")
        plain = create_model("resnet50")
    assert count_params(tweaked) == count_params(reference) == 25_576_264
    assert list(tweaked.state_dict()) == list(reference.state_dict())
    assert isinstance(tweaked.conv1, nn.Sequential) and len(tweaked.conv1) == 7
    assert isinstance(tweaked.layer2[0].downsample[0], nn.AvgPool2d)
    assert isinstance(tweaked.layer1[0].downsample[0], nn.Identity)  # stride 1: no pooling
    assert isinstance(plain.layer2[0].downsample[0], nn.Conv2d) and plain.layer2[0].downsample[0].stride == (2, 2)


def test_torchvision_parameter_names():
    with torch.device("meta"):
        resnet = create_model("resnet50").state_dict()
        vgg = create_model("vgg16_bn").state_dict()
        densenet = create_model("densenet121").state_dict()
        inception = create_model("inception_v3", aux_logits=True).state_dict()
        seresnet = create_model("seresnet50").state_dict()
        res2net = create_model("res2net50_26w_4s").state_dict()
    assert {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer4.2.conv3.weight",
            "layer4.2.bn3.num_batches_tracked", "fc.weight", "fc.bias"} <= set(resnet)
    assert len(resnet) == 320  # torchvision resnet50: 161 parameters and 159 buffers
    assert {"features.0.weight", "features.1.running_mean", "features.41.weight", "classifier.0.weight",
            "classifier.3.weight", "classifier.6.bias"} <= set(vgg)
    assert {"features.conv0.weight", "features.norm0.weight", "features.denseblock1.denselayer1.norm1.weight",
            "features.denseblock4.denselayer16.conv2.weight", "features.transition3.conv.weight",
            "features.norm5.bias", "classifier.weight"} <= set(densenet)
    assert {"Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch_pool.bn.running_var", "Mixed_7c.branch3x3dbl_3b.conv.weight",
            "AuxLogits.conv1.conv.weight", "AuxLogits.fc.weight", "fc.weight"} <= set(inception)
    assert {"layer1.0.se.fc1.weight", "layer4.2.se.fc2.bias"} <= set(seresnet)
    assert seresnet["layer1.0.se.fc1.weight"].shape == (16, 256, 1, 1)  # reduction 16 of 256
    assert {"layer1.0.convs.2.weight", "layer1.0.bns.0.running_mean", "layer4.2.conv3.weight"} <= set(res2net)


def test_inception_aux_head():
    with torch.device("meta"):
        model = create_model("inception_v3", num_classes=4, aux_logits=True)
        assert count_params(model) == 27_161_264 - (1000 - 4) * (2048 + 1 + 768 + 1)
        out, aux = model.train()(torch.empty(2, 3, 299, 299))
        assert out.shape == aux.shape == (2, 4)
        assert model.eval()(torch.empty(2, 3, 299, 299)).shape == (2, 4)
    assert create_model("inception_v3").AuxLogits is None


def test_drop_path_and_dropout():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, drop_path_rate=0.2)
    rates = [m.rate for m in model.modules() if m.__class__.__name__ == "DropPath"]
    assert len(rates) == 7 and rates[-1] == pytest.approx(0.2)  # linear in depth, the first block gets 0
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    wrn = create_model("wrn16_4", drop_rate=0.3, drop_path_rate=0.1)
    assert sum(isinstance(m, nn.Dropout) for m in wrn.modules()) == 6
    assert count_params(wrn) == model_info("wrn16_4").published_params


def test_wide_and_grouped_bottlenecks():
    with torch.device("meta"):
        wide = create_model("wide_resnet50_2")
        resnext = create_model("resnext101_32x8d")
    assert wide.layer1[0].conv2.out_channels == 128 and wide.layer1[0].conv3.out_channels == 256
    assert resnext.layer1[0].conv2.groups == 32 and resnext.layer1[0].conv2.out_channels == 256


@pytest.mark.parametrize("name", ["resnet20", "smallcnn"])
def test_converted_models_split_features_and_head(name):
    model = create_model(name).eval()
    c, h, w = model_info(name).input_size
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.equal(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
