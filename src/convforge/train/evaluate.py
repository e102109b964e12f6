"""Evaluation: top-1, top-5, per-class accuracy, confusion matrix, optional flip test-time augmentation."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge.data import BatchLoader, Split
from convforge.data.views import EvalView
from convforge.errors import ConfigError
from convforge.train.distributed import all_reduce_sum


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, tta: bool = False, amp: bool = False, tta_shift: int = 0
) -> torch.Tensor:
    """Logits of ``model`` for ``x``; ``tta``: averaged with the mirrored images'; ``tta_shift`` N > 0 (with
    ``tta``): half the weight on that, a quarter each on the flip TTA of the images shifted by N pixels up-left
    and down-right with reflect padding (airbench94's level-2 TTA)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x).float()
        if tta:
            logits = 0.5 * (logits + model(x.flip(3)).float())
        if tta and tta_shift:
            n, (h, w) = tta_shift, x.shape[-2:]
            padded = F.pad(x, (n, n, n, n), mode="reflect")
            shifted = [padded[..., :h, :w], padded[..., 2 * n:, 2 * n:]]
            mirrored = [0.5 * (model(v).float() + model(v.flip(3)).float()) for v in shifted]
            logits = 0.5 * logits + 0.25 * (mirrored[0] + mirrored[1])
    return logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Any,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    view: EvalView | None = None,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    tta: bool = False,
    tta_shift: int = 0,
    amp: bool = False,
    channels_last: bool = False,
    num_classes: int | None = None,
    details: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``split``: a fixed-size :class:`Split`, or an image store or a shard split
    (``convforge.data.shard_dataset.ShardSplit``, read in shard order) whose evaluation transform
    ``view`` (``convforge.data.views.EvalView``: size, crop_pct, interpolation) resizes each image to
    size / crop_pct and centre-crops it.
    ``details`` adds per-class accuracy and the confusion matrix.

    With ``world_size`` > 1 each process evaluates its share of the images and the counts are summed.
    """
    if getattr(split, "is_shards", False):
        if view is None:
            raise ConfigError("evaluating shards needs their view: (image size, crop_pct, interpolation)")
        loader: Any = split.loader(batch_size, mean, std, image_size=tuple(view.size), crop_pct=view.crop_pct,
                                   interpolation=view.interpolation, device=device, channels_last=channels_last,
                                   rank=rank, world_size=world_size)
        num_classes = num_classes or len(split.shards.classes)
    elif view is None:
        loader = BatchLoader(split, batch_size, mean, std, device=device, channels_last=channels_last,
                             rank=rank, world_size=world_size)
    else:
        from convforge.data.store_loader import StoreLoader

        loader = StoreLoader(split, batch_size, mean, std, train=False, image_size=tuple(view.size),
                             crop_pct=view.crop_pct, interpolation=view.interpolation, device=device,
                             channels_last=channels_last, rank=rank, world_size=world_size)
    return evaluate_batches(model, loader, num_classes or int(split.labels.max()) + 1, tta=tta, amp=amp,
                            details=details, world_size=world_size, tta_shift=tta_shift)


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    tta: bool = False,
    amp: bool = False,
    details: bool = True,
    world_size: int = 1,
    tta_shift: int = 0,
) -> dict[str, Any]:
    """Top-1, top-5, mean loss and image count (``details``: also per-class accuracy and the confusion
    matrix) of ``model`` over normalised ``(x, y)`` batches; counts are summed over ``world_size`` processes."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, top5_hits, count = 0.0, 0, 0
    for x, y in batches:
        logits = predict_logits(model, x, tta=tta, amp=amp, tta_shift=tta_shift)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        k = min(5, logits.shape[1])
        top5_hits += int((logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum())
        pred = logits.argmax(dim=1)
        confusion += torch.bincount((y * num_classes + pred).cpu(), minlength=num_classes**2).view(num_classes, num_classes)
        count += y.shape[0]
    model.train(was_training)
    if world_size > 1:
        totals = all_reduce_sum(torch.tensor([loss_sum, top5_hits, count], dtype=torch.float64))
        loss_sum, top5_hits, count = totals[0].item(), int(totals[1].item()), int(totals[2].item())
        all_reduce_sum(confusion)
    correct = int(confusion.diag().sum())
    result: dict[str, Any] = {
        "top1": 100.0 * correct / max(count, 1),
        "top5": 100.0 * top5_hits / max(count, 1),
        "loss": loss_sum / max(count, 1),
        "images": count,
    }
    if details:
        per_class_total = confusion.sum(dim=1)
        result["per_class"] = [
            (100.0 * int(confusion[i, i]) / int(per_class_total[i])) if per_class_total[i] else None
            for i in range(num_classes)
        ]
        result["confusion"] = confusion.tolist()
    return result
