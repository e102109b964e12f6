"""SpeedNet: convforge's network for fast CIFAR training on a CPU budget, after Keller Jordan's airbench.

The ideas kept from airbench (94% on CIFAR-10 in 3.29 s on an A100) are the ones that pay on a CPU:
a frozen 2x2 patch-whitening first layer initialised from the training images, three
``conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU`` groups (pooling before normalisation, so the
expensive convolutions after it run at a quarter of the resolution), global max pooling and a
scaled, bias-free linear head. Widths are chosen for the 2-core CPU (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
from torch import nn

from convforge.models.base import Classifier
from convforge.models.registry import register_model


class ConvGroup(nn.Sequential):
    """conv3x3 -> 2x2 max-pool -> BN -> GELU -> conv3x3 -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int, norm: "NormSettings | None" = None) -> None:
        norm = norm or NormSettings()
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            norm.make(c_out),
            nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            norm.make(c_out),
            nn.GELU(),
        )


class NormSettings:
    """How SpeedNet's BatchNorms are built. airbench94 uses ``momentum=0.4`` (its 0.6 in the other convention),
    ``eps=1e-12`` and a frozen scale (only the shift trains): ``NormSettings.airbench()``."""

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, train_scale: bool = True) -> None:
        self.momentum, self.eps, self.train_scale = momentum, eps, train_scale

    @classmethod
    def airbench(cls) -> "NormSettings":
        return cls(momentum=0.4, eps=1e-12, train_scale=False)

    def make(self, channels: int) -> nn.BatchNorm2d:
        norm = nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum)
        norm.weight.requires_grad_(self.train_scale)
        return norm


class SpeedNet(Classifier):
    """Whitening stem, three conv groups, global max pooling, linear head scaled by ``head_scale``.

    ``airbench=True`` takes airbench94's BatchNorms (momentum 0.4, eps 1e-12, scale frozen at 1) and
    initialisation (PyTorch's default, then identity kernels in the first c_in filters of every conv).

    Call :meth:`init_from_data` with a batch of (normalised) training images before training: it
    sets the stem to the whitening transform of the images' 2x2 patches and freezes it. ``whiten=False``
    keeps a plain trainable stem instead: whitening multiplies the faintest patch directions by up to
    1/sqrt(eps) (about 45x), which leaves small input perturbations free to move the logits, the
    opposite of what adversarial training needs.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, int, int] = (64, 256, 256),
        head_scale: float = 1 / 9,
        whiten: bool = True,
        airbench: bool = False,
    ) -> None:
        super().__init__()
        self.whiten = whiten
        stem_width = 2 * in_chans * 4  # every eigenvector of the 2x2 patch covariance, with both signs
        self.stem = nn.Conv2d(in_chans, stem_width, 2, padding=0, bias=True)
        self.stem_act = nn.GELU()
        chans = (stem_width, *widths)
        norm = NormSettings.airbench() if airbench else NormSettings()
        self.stages = nn.Sequential(*(ConvGroup(a, b, norm) for a, b in zip(chans[:-1], chans[1:])))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.num_features = widths[-1]
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        self.head_scale = head_scale
        for m in self.stages.modules():
            if isinstance(m, nn.Conv2d):
                if airbench:  # airbench94: PyTorch's default init, then the first c_in filters pass their input through
                    nn.init.dirac_(m.weight[:m.in_channels])
                else:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to whiten the 2x2 patches of ``images`` (N, C, H, W) and freeze its weights
        (nothing with ``whiten=False``)."""
        if not self.whiten:
            return
        c = images.shape[1]
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H-1, W-1, 2, 2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4).double()
        patches = patches - patches.mean(0)
        covariance = patches.T @ patches / patches.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / (eigenvalues.clamp_min(0) + eps).sqrt()[:, None]).view(-1, c, 2, 2)
        self.stem.weight.copy_(torch.cat([filters, -filters]).float())
        self.stem.weight.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem_act(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        return x if pre_logits else self.fc(x) * self.head_scale


@register_model(
    family="speednet",
    paper="convforge; after K. Jordan, 94% on CIFAR-10 in 3.29 Seconds on a Single GPU (airbench, 2024)",
    year=2024,
    input_size=(3, 32, 32),
    num_classes=10,
    description="CPU-budget CIFAR net after airbench94 (whitening stem, widths 64/256/256)",
)
def speednet(num_classes: int = 10, in_chans: int = 3, widths: tuple[int, int, int] = (64, 256, 256),
             whiten: bool = True, airbench: bool = False) -> SpeedNet:
    """airbench94's layout: whitening stem (``whiten=False``: a plain trainable one), conv groups of widths
    64/256/256; ``airbench=True``: airbench94's BatchNorm settings and initialisation too."""
    return SpeedNet(num_classes=num_classes, in_chans=in_chans, widths=tuple(widths),  # type: ignore[arg-type]
                    whiten=whiten, airbench=airbench)


@register_model(
    family="speednet",
    paper="convforge; after K. Jordan, 94% on CIFAR-10 in 3.29 Seconds on a Single GPU (airbench, 2024)",
    year=2024,
    input_size=(3, 32, 32),
    num_classes=10,
    description="Narrower SpeedNet for the 2-core CPU budget (widths 64/128/256)",
)
def speednet_small(num_classes: int = 10, in_chans: int = 3) -> SpeedNet:
    """SpeedNet with widths 64/128/256."""
    return SpeedNet(num_classes=num_classes, in_chans=in_chans, widths=(64, 128, 256))
