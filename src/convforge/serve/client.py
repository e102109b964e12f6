"""A small client for ``convforge serve`` on the standard library (urllib): no extra dependency.

    from convforge.serve.client import predict, describe

    predict("cat.jpg")                                   # {"predictions": [{"image": ..., "top": [...]}], ...}
    predict(["a.png", "b.png"], "http://127.0.0.1:8000", top_k=3)
    describe()                                           # what GET /v1/model says
"""

from __future__ import annotations

import json
import mimetypes
import uuid
from pathlib import Path
from typing import Any, Sequence
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from convforge.errors import ConvforgeError

DEFAULT_URL = "http://127.0.0.1:8000"


class ServeClientError(ConvforgeError):
    """The server refused a request (``status``, ``code`` and its message) or could not be reached (status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}" if status else message)
        self.status = status
        self.code = code


def predict(images: Any, url: str = DEFAULT_URL, *, top_k: int = 5, timeout: float = 60.0) -> dict[str, Any]:
    """The server's JSON answer for one image (a path or bytes) or a list of them (sent as a multipart form);
    dense models' masks and images come as base64 PNGs (``mask_png``, ``image_png``)."""
    target = f"{url.rstrip('/')}/v1/predict?top_k={int(top_k)}&format=json"
    if isinstance(images, (str, Path, bytes)):
        data, kind = _content(images)
        return _call(Request(target, data=data, method="POST", headers={"Content-Type": kind}), timeout)
    body, kind = multipart(list(images))
    return _call(Request(target, data=body, method="POST", headers={"Content-Type": kind}), timeout)


def describe(url: str = DEFAULT_URL, timeout: float = 10.0) -> dict[str, Any]:
    """``GET /v1/model``: the served model's task, classes, input size, normalisation, preprocessing, metrics."""
    return _call(Request(f"{url.rstrip('/')}/v1/model"), timeout)


def multipart(images: Sequence[Any]) -> tuple[bytes, str]:
    """A multipart/form-data body with one ``image`` file part per image, and its Content-Type."""
    boundary = f"convforge-{uuid.uuid4().hex}"
    parts = []
    for i, image in enumerate(images):
        data, kind = _content(image)
        name = Path(image).name if isinstance(image, (str, Path)) else f"image-{i}"
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _content(image: Any) -> tuple[bytes, str]:
    if isinstance(image, bytes):
        return image, "application/octet-stream"
    path = Path(image)
    kind = mimetypes.guess_type(path.name)[0]
    return path.read_bytes(), kind if kind and kind.startswith("image/") else "application/octet-stream"


def _call(request: Request, timeout: float) -> dict[str, Any]:
    try:
        with urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError):
            error = {"code": "http_error", "message": str(exc.reason)}
        raise ServeClientError(exc.code, error.get("code", "?"), error.get("message", "")) from None
    except URLError as exc:
        raise ServeClientError(0, "unreachable", f"cannot reach {request.full_url}: {exc.reason}") from None
