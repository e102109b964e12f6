"""The interface every zoo classifier shares: features, head, and BatchNorm folding."""

from __future__ import annotations

import torch
import torch.nn as nn

from convforge.layers.fuse import fold_batchnorm


class Classifier(nn.Module):
    """Base class: subclasses implement ``forward_features`` (image -> feature map) and
    ``forward_head`` (feature map -> logits, or pooled features with ``pre_logits=True``).

    ``num_features`` is the width of the pooled feature vector that the classifier reads.
    """

    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def fuse(self) -> "Classifier":
        """Fold BatchNorm into the preceding convolutions (eval mode, in place); returns ``self``."""
        fold_batchnorm(self)
        return self


def init_conv_bn_linear(model: nn.Module, linear_std: float = 0.01) -> None:
    """torchvision's initialisation for VGG and MobileNets: He-normal (fan-out) convolutions,
    BatchNorm scale 1 and shift 0, classifier weights from N(0, ``linear_std``), zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
