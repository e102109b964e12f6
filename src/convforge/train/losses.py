"""Losses for dense prediction: cross-entropy with an ignore index, optionally plus soft Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1.0


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft multi-class Dice loss, ``1 - mean_c (2 |P_c . T_c| + s) / (|P_c| + |T_c| + s)``.

    ``P_c`` are the softmax probabilities of class c and ``T_c`` the one-hot target, summed over
    every labelled pixel of the batch (pixels whose mask is ``ignore_index`` are left out of both);
    the mean runs over all classes, and the smoothing ``s`` makes a class absent from both target
    and prediction score about 1 rather than 0/0. A perfect, confident prediction gives about 0.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(1)
    valid = (masks != ignore_index).unsqueeze(1).to(probs.dtype)  # (N, 1, H, W)
    target = F.one_hot(torch.where(masks == ignore_index, torch.zeros_like(masks), masks).long(), num_classes)
    target = target.permute(0, 3, 1, 2).to(probs.dtype) * valid
    probs = probs * valid
    dims = (0, 2, 3)
    intersection = (probs * target).sum(dims)
    cardinality = probs.sum(dims) + target.sum(dims)
    dice = (2 * intersection + smooth) / (cardinality + smooth)
    return 1.0 - dice.mean()


def segmentation_loss(
    logits: torch.Tensor, masks: torch.Tensor, ignore_index: int, dice_weight: float = 0.0
) -> torch.Tensor:
    """Cross-entropy over the pixels whose mask is not ``ignore_index`` (mean per labelled pixel; 0
    when there is none), plus ``dice_weight`` times :func:`soft_dice_loss`.

    ``logits`` (N, K, H, W), ``masks`` (N, H, W) integer class indices; logits of another spatial
    size are resized bilinearly to the masks' first.
    """
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    masks = masks.long()
    # Sum / count rather than reduction="mean": 0 (not NaN) for an all-ignored batch, and no host sync.
    labelled = (masks != ignore_index).sum().clamp_min(1)
    loss = F.cross_entropy(logits.float(), masks, ignore_index=ignore_index, reduction="sum") / labelled
    if dice_weight:
        loss = loss + dice_weight * soft_dice_loss(logits, masks, ignore_index)
    return loss
