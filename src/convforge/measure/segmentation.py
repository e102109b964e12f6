"""Segmentation metrics: the pixel confusion matrix, pixel accuracy, per-class IoU and mIoU, and evaluation.

Conventions (those of the FCN, SegNet and DeepLab papers): the confusion matrix is accumulated over
every non-ignored pixel of the whole split (rows: true class, columns: predicted class), then

- pixel accuracy = correct pixels / labelled pixels;
- mean (class) accuracy = mean over classes present in the target of (correct / pixels of the class);
- IoU of class c = TP / (TP + FP + FN); ``None`` for a class absent from both target and
  prediction (0 / 0), and mIoU is the mean over the classes whose IoU is defined, i.e. the classes
  present in the target or the prediction. Pixels whose target is the ignore index count nowhere.

Scores are percentages (0-100), like ``top1`` in :func:`convforge.train.evaluate.evaluate`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convforge.data.dataset import Split
from convforge.data.joint_augment import SegmentationLoader


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = target class, columns = predicted class, over
    the pixels whose target is not ``ignore_index``. Other out-of-range values are a ValueError."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction of shape {tuple(pred.shape)} but target of shape {tuple(target.shape)}")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel():
        for name, values in (("target", target), ("prediction", pred)):
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= num_classes:
                bad = low if low < 0 else high
                raise ValueError(f"{name} value {bad} is outside 0..{num_classes - 1} (and not the ignore index {ignore_index})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).cpu()


def segmentation_scores(confusion: torch.Tensor) -> dict[str, Any]:
    """``pixel_acc``, ``mean_acc``, ``miou`` (percent) and ``per_class_iou`` (percent, ``None`` where a
    class is absent from both target and prediction) from a confusion matrix (see the module docstring)."""
    confusion = confusion.to(torch.float64)
    tp = confusion.diag()
    target_count = confusion.sum(1)
    pred_count = confusion.sum(0)
    union = target_count + pred_count - tp
    total = float(confusion.sum())
    per_class_iou = [100.0 * float(tp[c] / union[c]) if union[c] > 0 else None for c in range(len(tp))]
    defined = [v for v in per_class_iou if v is not None]
    present = target_count > 0
    return {
        "pixel_acc": 100.0 * float(tp.sum()) / total if total else 0.0,
        "mean_acc": 100.0 * float((tp[present] / target_count[present]).mean()) if bool(present.any()) else 0.0,
        "miou": sum(defined) / len(defined) if defined else 0.0,
        "per_class_iou": per_class_iou,
    }


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    split: Split,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    num_classes: int,
    ignore_index: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Evaluate a segmentation model on a split with (N, H, W) masks: ``loss`` (cross-entropy per
    labelled pixel), ``pixel_acc``, ``mean_acc``, ``miou``, ``per_class_iou``, ``images``, ``images_per_s``.

    With ``world_size`` > 1 each process evaluates its share of the images and the counts are summed.
    """
    from convforge.collectives import all_reduce_sum

    was_training = model.training
    model.eval()
    loader = SegmentationLoader(split, batch_size, mean, std, device=device, channels_last=channels_last,
                                ignore_index=ignore_index, rank=rank, world_size=world_size)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, pixels, count = 0.0, 0, 0
    start = time.perf_counter()
    for x, y in loader:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x).float()
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss_sum += float(F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum"))
        pixels += int((y != ignore_index).sum())
        confusion += confusion_matrix(logits.argmax(1), y, num_classes, ignore_index)
        count += y.shape[0]
    elapsed = time.perf_counter() - start
    model.train(was_training)
    if world_size > 1:
        totals = all_reduce_sum(torch.tensor([loss_sum, pixels, count], dtype=torch.float64))
        loss_sum, pixels, count = totals[0].item(), int(totals[1].item()), int(totals[2].item())
        all_reduce_sum(confusion)
    result: dict[str, Any] = {"loss": loss_sum / max(pixels, 1)}
    result.update(segmentation_scores(confusion))
    result.update({"images": count, "images_per_s": count / elapsed if elapsed > 0 else 0.0})
    return result
