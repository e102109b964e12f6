"""Semantic segmentation: a class per pixel; mean IoU selects the best checkpoint."""

from __future__ import annotations

from typing import Any

from convforge.errors import DataError
from convforge.train.tasks.base import Task


class SegmentTask(Task):
    """Segmentation data (``segfolder:DIR``), joint image/mask augmentation, cross-entropy (+ Dice) loss."""

    name = "segment"
    primary = "miou"
    unit = "% mIoU"

    def augments(self) -> tuple[str, ...]:
        from convforge.data.joint_augment import SEG_AUGMENTS

        return tuple(SEG_AUGMENTS)

    def load_data(self, cfg, log):
        data = super().load_data(cfg, log)
        if getattr(data, "task", None) != "segment":
            raise DataError(f"--task segment needs segmentation data (segfolder:DIR), got {cfg.data!r}")
        return data

    def train_loader(self, data, cfg, model, device, rank, world_size):
        from convforge.data.joint_augment import SegmentationLoader

        return SegmentationLoader(data.train, cfg.batch_size, data.mean, data.std, shuffle=True,
                                  augment=cfg.augment, scales=tuple(cfg.seg_scales),
                                  crop=tuple(int(v) for v in cfg.seg_crop) if cfg.seg_crop else None,
                                  ignore_index=data.ignore_index, drop_last=True, seed=cfg.seed, device=device,
                                  channels_last=cfg.channels_last, rank=rank, world_size=world_size)

    def loss(self, output, target, cfg, data):
        from convforge.train.losses import segmentation_loss

        return segmentation_loss(output, target, data.ignore_index, cfg.dice_weight)

    def evaluate(self, model, data, split, cfg, device, rank, world_size):
        from convforge.measure.segmentation import evaluate_segmentation

        result = evaluate_segmentation(model, data.split(split), data.mean, data.std, num_classes=data.num_classes,
                                       ignore_index=data.ignore_index, batch_size=max(8, cfg.batch_size),
                                       device=device, amp=cfg.amp, channels_last=cfg.channels_last,
                                       rank=rank, world_size=world_size)
        return {k: result[k] for k in ("loss", "miou", "pixel_acc", "mean_acc", "per_class_iou")}

    def meta(self, data: Any) -> dict[str, Any]:
        return {"ignore_index": data.ignore_index}
