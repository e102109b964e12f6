"""Pictures embedded in the report: uint8 images as PNG bytes."""

from __future__ import annotations

from typing import Any


def image_png(image: Any, display: int = 96) -> bytes:
    """A uint8 (C, H, W) image as PNG, enlarged with nearest-neighbour to about ``display`` pixels
    (tiny images stay sharp) or shrunk to it."""
    import io

    import numpy as np
    from PIL import Image

    array = np.asarray(image)
    if array.ndim == 3:
        array = array[0] if array.shape[0] not in (3,) else array.transpose(1, 2, 0)
    picture = Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))
    height, width = array.shape[:2]
    if max(height, width) < display:
        factor = max(1, display // max(height, width))
        picture = picture.resize((width * factor, height * factor), Image.NEAREST)
    elif max(height, width) > 2 * display:
        picture.thumbnail((2 * display, 2 * display))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()
