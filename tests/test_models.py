"""The model registry, the CIFAR ResNets, the small CNN and the complexity counters."""

from __future__ import annotations

import pytest
import torch

import convforge
from convforge.errors import ConfigError
from convforge.measure import count_macs, count_params
from convforge.models import list_models, model_info

# Parameter counts of the reference implementation (akamaster/pytorch_resnet_cifar10, option-A shortcuts).
REFERENCE_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018}


@pytest.mark.parametrize("name,expected", sorted(REFERENCE_PARAMS.items()))
def test_resnet_param_counts_match_reference(name, expected):
    model = convforge.create_model(name, num_classes=10)
    assert count_params(model) == expected
    assert sum(p.numel() for p in model.parameters()) == expected
    # within 2% of the paper's rounded figure
    published = model_info(name).published_params
    assert abs(expected - published) / published < 0.02


def test_resnet_forward_shapes():
    model = convforge.create_model("resnet20", num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    # global pooling: other input sizes and channel counts work too
    gray = convforge.create_model("resnet20", num_classes=4, in_chans=1).eval()
    with torch.no_grad():
        assert gray(torch.randn(3, 1, 16, 16)).shape == (3, 4)


def test_resnet_defaults_come_from_registry():
    model = convforge.create_model("resnet32")
    assert model.linear.out_features == model_info("resnet32").num_classes == 10
    assert model.conv1.in_channels == 3
    assert model.convforge_name == "resnet32"


def test_resnet_shortcut_b_adds_projection_parameters():
    a = convforge.create_model("resnet20", num_classes=10)
    b = convforge.create_model("resnet20", num_classes=10, shortcut="B")
    assert count_params(b) > count_params(a)
    assert b(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_bad_model_args_are_config_errors():
    with pytest.raises(ConfigError, match="bad arguments for model 'resnet20'"):
        convforge.create_model("resnet20", no_such_arg=1)
    with pytest.raises(ConfigError, match="num_classes"):
        convforge.create_model("resnet20", num_classes=0)


@pytest.mark.parametrize("size", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 5, 5)])
def test_smallcnn_forward_any_size(size):
    model = convforge.create_model("smallcnn", num_classes=5, in_chans=size[0]).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *size)).shape == (2, 5)


def test_smallcnn_widths():
    model = convforge.create_model("smallcnn", num_classes=3, in_chans=1, widths=[8, 16])
    assert model.widths == (8, 16)
    assert model.fc.in_features == 16
    assert count_params(model) < count_params(convforge.create_model("smallcnn", num_classes=3, in_chans=1))


def test_list_models_wildcard_and_substring():
    resnets = list_models("resnet*")
    assert resnets == sorted(resnets)
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"} <= set(resnets)
    assert all(name.startswith("resnet") for name in resnets)
    assert "smallcnn" not in resnets
    assert list_models("resnet5?") == ["resnet50", "resnet56"]  # the CIFAR and the ImageNet family
    assert list_models("cnn") == ["fsrcnn", "smallcnn", "srcnn_915", "srcnn_955"]  # substring
    assert set(list_models()) >= set(resnets) | {"smallcnn"}
    assert list_models("no-such-model-*") == []


def test_unknown_model_lists_closest_names():
    with pytest.raises(ConfigError) as info:
        convforge.create_model("resnet21", num_classes=10)
    message = str(info.value)
    assert "resnet21" in message and "resnet20" in message
    assert "convforge models" in message


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError, match="registered twice"):
        convforge.register_model("resnet20", family="x")(lambda num_classes=1, in_chans=1: torch.nn.Identity())


def test_count_macs_resnet20():
    model = convforge.create_model("resnet20", num_classes=10)
    macs = count_macs(model, (3, 32, 32))
    assert 40e6 <= macs <= 41.5e6
    # deeper is more expensive; MACs per image do not depend on the batch size
    assert count_macs(convforge.create_model("resnet32"), (3, 32, 32)) > macs
    assert count_macs(model, (3, 32, 32), batch_size=3) == macs
    # counting leaves the training flag alone
    assert model.training


def test_count_params_trainable_only():
    model = convforge.create_model("smallcnn", num_classes=10)
    total = count_params(model)
    for p in model.fc.parameters():
        p.requires_grad_(False)
    assert count_params(model, trainable_only=True) == total - sum(p.numel() for p in model.fc.parameters())
    assert count_params(model) == total
