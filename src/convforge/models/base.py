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
