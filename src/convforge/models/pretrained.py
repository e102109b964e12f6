"""The preprocessing that published ImageNet weights expect, per registry entry (as timm's ``pretrained_cfg``).

convforge's ImageNet models keep torchvision's parameter layout, so torchvision's ``IMAGENET1K_V1``
weight files load into them unchanged; each entry below repeats that file's published evaluation
transform (``torchvision.transforms._presets.ImageClassification``: resize the shorter side to
``resize``, centre-crop ``input_size``, normalise with ``mean``/``std``). ``crop_pct`` is
``crop / resize``, the form convforge's ``--crop-pct`` takes. CIFAR-sized, dense (segmentation) and
super-resolution models have no entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedCfg:
    """What a model's published ImageNet weights expect of their inputs."""

    weights: str  # the weight file this describes, e.g. "torchvision:ResNet50_Weights.IMAGENET1K_V1"; "" if none
    input_size: tuple[int, int, int] = (3, 224, 224)  # (C, H, W) of the centre crop
    resize: int = 256  # the shorter side is resized to this before the centre crop
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def crop_pct(self) -> float:
        """The crop's share of the resized side (224 / 256 = 0.875)."""
        return self.input_size[-1] / self.resize

    @property
    def image_size(self) -> int:
        """The side of the square crop the weights were evaluated at."""
        return self.input_size[-1]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``convforge models --json``, checkpoints' ``init`` record)."""
        return {"weights": self.weights, "input_size": list(self.input_size), "resize": self.resize,
                "crop_pct": self.crop_pct, "interpolation": self.interpolation, "mean": list(self.mean),
                "std": list(self.std)}


def _tv(weights: str, crop: int = 224, resize: int = 256, interpolation: str = "bilinear") -> PretrainedCfg:
    """An entry for torchvision's ``weights`` (its ImageClassification defaults: 224 from 256, bilinear)."""
    return PretrainedCfg(f"torchvision:{weights}", (3, crop, crop), resize, interpolation)


# Models with no torchvision weights (timm or the authors publish theirs, with other transforms per
# release): the classic ImageNet default, resize 256 / crop 224 bilinear, ImageNet mean/std.
_IMAGENET_DEFAULT = PretrainedCfg("")

_TABLE: dict[str, PretrainedCfg] = {
    **{f"resnet{d}": _tv(f"ResNet{d}_Weights.IMAGENET1K_V1") for d in (18, 34, 50, 101, 152)},
    "resnext50_32x4d": _tv("ResNeXt50_32X4D_Weights.IMAGENET1K_V1"),
    "resnext101_32x8d": _tv("ResNeXt101_32X8D_Weights.IMAGENET1K_V1"),
    "wide_resnet50_2": _tv("Wide_ResNet50_2_Weights.IMAGENET1K_V1"),
    "wide_resnet101_2": _tv("Wide_ResNet101_2_Weights.IMAGENET1K_V1"),
    "resnet50d": _IMAGENET_DEFAULT,  # timm-only model (ImageNet default; timm's own weights vary by release)
    "seresnet50": _IMAGENET_DEFAULT,  # timm-only model (ImageNet default)
    "res2net50_26w_4s": _IMAGENET_DEFAULT,  # the authors'/timm's weights (ImageNet default)
    **{f"vgg{d}{bn}": _tv(f"VGG{d}{bn.upper()}_Weights.IMAGENET1K_V1") for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    **{f"densenet{d}": _tv(f"DenseNet{d}_Weights.IMAGENET1K_V1") for d in (121, 161, 169, 201)},
    "inception_v3": _tv("Inception_V3_Weights.IMAGENET1K_V1", crop=299, resize=342),
    "mobilenet_v1": _IMAGENET_DEFAULT,  # not in torchvision (ImageNet default)
    "mobilenet_v2": _tv("MobileNet_V2_Weights.IMAGENET1K_V1"),
    "mobilenet_v3_large": _tv("MobileNet_V3_Large_Weights.IMAGENET1K_V1"),
    "mobilenet_v3_small": _tv("MobileNet_V3_Small_Weights.IMAGENET1K_V1"),
    # EfficientNet V1 weights (ported from the reference implementations): bicubic, per-size crops.
    "efficientnet_b0": _tv("EfficientNet_B0_Weights.IMAGENET1K_V1", 224, 256, "bicubic"),
    "efficientnet_b1": _tv("EfficientNet_B1_Weights.IMAGENET1K_V1", 240, 256, "bicubic"),
    "efficientnet_b2": _tv("EfficientNet_B2_Weights.IMAGENET1K_V1", 288, 288, "bicubic"),
    "efficientnet_b3": _tv("EfficientNet_B3_Weights.IMAGENET1K_V1", 300, 320, "bicubic"),
    "efficientnet_b4": _tv("EfficientNet_B4_Weights.IMAGENET1K_V1", 380, 384, "bicubic"),
    "efficientnet_b5": _tv("EfficientNet_B5_Weights.IMAGENET1K_V1", 456, 456, "bicubic"),
    "efficientnet_b6": _tv("EfficientNet_B6_Weights.IMAGENET1K_V1", 528, 528, "bicubic"),
    "efficientnet_b7": _tv("EfficientNet_B7_Weights.IMAGENET1K_V1", 600, 600, "bicubic"),
    "convnext_tiny": _tv("ConvNeXt_Tiny_Weights.IMAGENET1K_V1", resize=236),
    "convnext_small": _tv("ConvNeXt_Small_Weights.IMAGENET1K_V1", resize=230),
    "convnext_base": _tv("ConvNeXt_Base_Weights.IMAGENET1K_V1", resize=232),
    "convnext_large": _tv("ConvNeXt_Large_Weights.IMAGENET1K_V1", resize=232),
    **{f"regnet{k}_{s}": _tv(f"RegNet_{k.upper()}_{s.upper()}_Weights.IMAGENET1K_V1")
       for k in ("x", "y") for s in ("400mf", "800mf", "1_6gf", "3_2gf")},
}


def pretrained_cfg(name: str) -> PretrainedCfg | None:
    """The published weights' preprocessing of registry model ``name``; None for models without ImageNet
    weights (CIFAR-sized, segmentation, super-resolution)."""
    return _TABLE.get(name)


def pretrained_names() -> list[str]:
    """The model names this table describes, sorted."""
    return sorted(_TABLE)
