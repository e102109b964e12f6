"""Model outputs as answers: top-k classes as JSON, segmentation masks as palette PNGs (pixel value = class
index, as ``convforge segment`` writes them), super-resolved images as PNGs."""

from __future__ import annotations

import base64
import io
import json
from typing import Any, Sequence

import numpy as np
import torch

from convforge.serve.backends import Served, top_classes


def png(array_hwc_or_hw: np.ndarray, palette: torch.Tensor | None = None) -> bytes:
    """A uint8 (H, W) or (H, W, C) array as PNG bytes; with ``palette``, an indexed (P) image."""
    from PIL import Image

    array = np.ascontiguousarray(array_hwc_or_hw)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    picture = Image.fromarray(array)
    if palette is not None:
        colours = torch.zeros(256, 3, dtype=torch.uint8)
        colours[: min(256, palette.shape[0])] = palette[:256]
        picture.putpalette(colours.flatten().tolist())  # L -> P, the pixel values stay the class indices
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png(served: Served, mask: torch.Tensor) -> bytes:
    """A class mask (uint8 H x W) as a palette PNG in the classes' colours."""
    from convforge.inspect.segmentation import palette_for

    return png(mask.numpy(), palette_for(served.classes))


def image_png(image_chw: torch.Tensor) -> bytes:
    """A uint8 (C, H, W) image as PNG bytes."""
    return png(image_chw.permute(1, 2, 0).numpy())


def predictions(served: Served, names: Sequence[str], outputs: Sequence[Any], top_k: int) -> dict[str, Any]:
    """The JSON answer of a prediction: per image, its top-k classes, or its mask/upscaled image as base64 PNG."""
    items = []
    for name, output in zip(names, outputs):
        if served.task == "classify":
            items.append({"image": name, "top": top_classes(output, served.classes, top_k)})
        elif served.task == "segment":
            items.append({"image": name, "class_shares": output["class_shares"],
                          "size": [int(output["mask"].shape[1]), int(output["mask"].shape[0])],
                          "mask_png": base64.b64encode(mask_png(served, output["mask"])).decode("ascii")})
        else:
            items.append({"image": name, "scale": int(served.meta.get("scale") or 0),
                          "size": [int(output.shape[2]), int(output.shape[1])],
                          "image_png": base64.b64encode(image_png(output)).decode("ascii")})
    return {"model": (served.meta.get("model") or {}).get("name"), "task": served.task, "backend": served.backend,
            "predictions": items}


def single_picture(served: Served, output: Any) -> tuple[bytes, dict[str, str]]:
    """One dense output as a PNG and its headers (a mask's class shares as JSON in ``X-Class-Shares``)."""
    if served.task == "segment":
        return mask_png(served, output["mask"]), {"X-Class-Shares": json.dumps(output["class_shares"])}
    return image_png(output), {"X-Scale": str(int(served.meta.get("scale") or 0))}
