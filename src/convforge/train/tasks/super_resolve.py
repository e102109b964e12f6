"""Single-image super-resolution: upscale by ``--scale``; PSNR on the first test set selects the best checkpoint."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from convforge.errors import DataError
from convforge.train.tasks.base import Task

SUPERRES_KINDS = ("superres", "sr")


class SuperResolveTask(Task):
    """Low/high-resolution patch pairs (``superres:DIR``), MSE loss, PSNR/SSIM on each test set."""

    name = "super-resolve"
    primary = "psnr"
    unit = " dB"
    outputs_are_classes = False  # the outputs are image channels: there is no class head

    def load_data(self, cfg, log):
        from convforge.data.superres import load_superres

        kind, _, root = cfg.data.partition(":")
        if kind not in SUPERRES_KINDS or not root:
            raise DataError(f"--task super-resolve needs --data superres:DIR (DIR with train-T91/ and test sets "
                            f"such as Set5/, Set14/, BSD100/), got {cfg.data!r}")
        data = load_superres(root, cfg.scale)
        data.spec = cfg.data
        return data

    def model_args(self, cfg, data):
        return {**super().model_args(cfg, data), "scale": cfg.scale}

    def train_loader(self, data, cfg, model, device, rank, world_size):
        from convforge.data.superres import SuperResLoader

        return SuperResLoader(data.train, cfg.batch_size, scale=data.scale,
                              upsampled_input=bool(getattr(model, "upsampled_input", False)),
                              augment=cfg.augment != "none", shuffle=True, drop_last=True, seed=cfg.seed,
                              device=device, channels_last=cfg.channels_last, rank=rank, world_size=world_size)

    def input_size(self, data, model):
        side = data.patch_size if getattr(model, "upsampled_input", False) else data.patch_size // data.scale
        return (data.channels, side, side)

    def loss(self, output, target, cfg, data):
        return F.mse_loss(output.float(), target)

    def eval_splits(self, data):
        return list(data.test_sets)

    def evaluate(self, model, data, split, cfg, device, rank, world_size):
        from convforge.measure.superres import evaluate_superres

        result = evaluate_superres(model, data.test_sets[split], data.scale,
                                   upsampled_input=bool(getattr(model, "upsampled_input", False)), device=device)
        return {k: result[k] for k in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")}

    def meta(self, data: Any) -> dict[str, Any]:
        return {"scale": data.scale}
