"""Super-resolution evaluation as SRCNN's code does it: PSNR and SSIM of the model and of bicubic on luma."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from convforge.data.superres import bicubic_pair, modcrop, run_model, to_uint8
from convforge.measure.quality import psnr, ssim


def evaluate_superres(
    model: nn.Module | None,
    images: list[torch.Tensor],
    scale: int,
    *,
    upsampled_input: bool,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """PSNR and SSIM of ``model`` and of bicubic on HR uint8 (1, H, W) luma ``images``, as SRCNN's code measures.

    Each image (cropped to a multiple of ``scale``) -> /255 -> LR = imresize(1/scale) -> bicubic =
    imresize(LR, scale); the model reads the bicubic image (``upsampled_input``) or the LR; its
    output is clamped to [0, 1]; output and bicubic are rounded to uint8 (MATLAB's ``uint8(x*255)``)
    and compared with the HR image with ``scale`` pixels shaved from each border. Means over images.
    ``model=None`` measures bicubic alone (the model figures are then the bicubic ones).
    """
    if not images:
        raise ValueError("evaluate_superres needs at least one image")
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    rows = []
    try:
        with torch.no_grad():
            for index, image in enumerate(images):
                if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 1:
                    raise ValueError(f"image {index}: expected uint8 (1, H, W), got {image.dtype} {tuple(image.shape)}")
                image = modcrop(image, scale)
                hr, lr, bicubic = bicubic_pair(image, scale)
                bic = to_uint8(bicubic)[0]
                row = {"index": index, "size": list(image.shape[1:]),
                       "bicubic_psnr": psnr(image, bic, shave=scale), "bicubic_ssim": ssim(image, bic, shave=scale)}
                if model is None:
                    rows.append({**row, "psnr": row["bicubic_psnr"], "ssim": row["bicubic_ssim"]})
                    continue
                model_input = bicubic if upsampled_input else lr
                output = run_model(model, model_input, device)
                if output.shape != hr.shape:
                    raise ValueError(
                        f"image {index}: the model turned a {tuple(model_input.shape[-2:])} input into "
                        f"{tuple(output.shape[-2:])}, expected {tuple(hr.shape[-2:])} "
                        f"(is upsampled_input={upsampled_input} right for this model?)"
                    )
                sr = to_uint8(output.clamp(0, 1))[0]
                rows.append({**row, "psnr": psnr(image, sr, shave=scale), "ssim": ssim(image, sr, shave=scale)})
    finally:
        if model is not None:
            model.train(was_training)
    n = len(rows)
    summary: dict[str, Any] = {key: sum(r[key] for r in rows) / n for key in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")}
    summary.update({"images": n, "per_image": rows})
    return summary
