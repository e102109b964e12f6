"""What the server accepts: body size, images per request, pixels per image, content types, array uploads.

Every check here runs before an image is decoded, so a hostile upload costs a header read, never a full
decode: a decompression bomb is refused from the width and height its header claims.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from convforge.serve.errors import ServeError

NPY_MAGIC = b"\x93NUMPY"
# Media types of a raw (non-multipart) body; image/* of any kind is accepted too, the content decides.
RAW_TYPES = ("application/octet-stream", "application/x-npy")
MULTIPART = "multipart/form-data"
SEND_HINT = ("send the image as the body with its type (curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg) "
             "or as a form upload (curl -F image=@photo.jpg)")


@dataclass(frozen=True)
class Limits:
    """Per-request limits: body bytes (413 above), images per request, pixels per decoded image (the
    decompression-bomb guard; below the data loader's own 64 M-pixel limit)."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_images: int = 64
    max_pixels: int = 40_000_000


def media_type(content_type: str | None) -> str:
    """``image/png; charset=x`` -> ``image/png`` (lower case); empty when absent."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_content_type(kind: str) -> None:
    """415 unless ``kind`` is multipart, an image type or one of :data:`RAW_TYPES`."""
    if kind == MULTIPART or kind.startswith("image/") or kind in RAW_TYPES:
        return
    shown = kind or "none"
    raise ServeError(415, "unsupported_media_type",
                     f"Content-Type {shown} is not accepted: {SEND_HINT}; accepted: image/*, "
                     f"{', '.join(RAW_TYPES)}, {MULTIPART}")


def check_declared_length(value: str | None, limits: Limits) -> None:
    """413 when the Content-Length header already says the body is over the limit (nothing is read)."""
    if value is None:
        return
    try:
        length = int(value)
    except ValueError:
        raise ServeError(400, "bad_content_length", f"Content-Length {value!r} is not a number") from None
    if length > limits.max_body_bytes:
        raise too_large(length, limits)


def too_large(size: int, limits: Limits) -> ServeError:
    """The 413 answer for a body of ``size`` bytes (or more)."""
    return ServeError(413, "body_too_large", f"the request body is {size:,} bytes or more, over the server's limit "
                                             f"of {limits.max_body_bytes:,} bytes (convforge serve --max-body-mb)")


def is_array(data: bytes) -> bool:
    """Whether ``data`` is a NumPy ``.npy`` file (by its magic bytes, whatever the declared type)."""
    return data.startswith(NPY_MAGIC)


def image_header(data: bytes, name: str, limits: Limits) -> tuple[str, int, int]:
    """(format, width, height) read from the header of an image upload; a ServeError when it is empty, not an
    image, or claims more pixels than ``limits.max_pixels`` (PIL's own bomb check is also an error here)."""
    from PIL import Image, UnidentifiedImageError

    from convforge.data.store import image_warnings

    if not data:
        raise ServeError(400, "empty_body", f"{name} is empty (0 bytes): {SEND_HINT}")
    try:
        with image_warnings(), Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            image_format = img.format or "?"
    except UnidentifiedImageError:
        raise ServeError(400, "not_an_image", f"{name} is not an image in a format the server reads (PNG, JPEG, "
                                              f"WebP, BMP, GIF, TIFF, ...) or its header is corrupt") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise bomb(name, str(exc), limits) from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a corrupt header
        raise ServeError(400, "corrupt_image", f"{name}: its image header cannot be read "
                                               f"({type(exc).__name__}: {exc})") from None
    if width < 1 or height < 1:
        raise ServeError(400, "corrupt_image", f"{name}: its header claims {width}x{height} pixels")
    if width * height > limits.max_pixels:
        raise bomb(name, f"its header claims {width}x{height} = {width * height:,} pixels", limits)
    return image_format, width, height


def bomb(name: str, why: str, limits: Limits) -> ServeError:
    """The 413 answer for an image over the pixel limit (a decompression bomb, or just too large)."""
    return ServeError(413, "image_too_large", f"{name} refused by the decompression-bomb guard: {why}, over the "
                                              f"server's limit of {limits.max_pixels:,} pixels; send a smaller image")


def read_array(data: bytes, name: str) -> np.ndarray:
    """A ``.npy`` upload as uint8 (H, W, C) with C = 1 or 3: (H, W) arrays get C = 1; other dtypes, shapes and
    channel counts are a 400 that says what to send."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, EOFError, OSError for bad files
        raise ServeError(400, "bad_array", f"{name} is not a readable .npy array ({type(exc).__name__}: {exc})") \
            from None
    if array.dtype != np.uint8:
        raise ServeError(400, "wrong_dtype", f"{name} has dtype {array.dtype}; send uint8 pixels (0..255)")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or min(array.shape) < 1:
        raise ServeError(400, "wrong_shape", f"{name} has shape {tuple(array.shape)}; send (H, W) or (H, W, C)")
    if array.shape[2] not in (1, 3):
        raise ServeError(400, "wrong_channels", f"{name} has {array.shape[2]} channels (shape "
                                                f"{tuple(array.shape)}); send 1 (grey) or 3 (RGB) channels "
                                                f"last, as (H, W) or (H, W, C)")
    return array
