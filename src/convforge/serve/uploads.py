"""Request bodies to uploads: a raw image (or ``.npy``) body, or the file parts of a multipart form; size-limited
while they are read, so a body over the limit is refused (413) without being held in memory."""

from __future__ import annotations

from typing import Any

from convforge.serve.errors import ServeError
from convforge.serve.limits import (
    MULTIPART,
    SEND_HINT,
    Limits,
    check_content_type,
    check_declared_length,
    media_type,
    too_large,
)


async def read_uploads(request: Any, limits: Limits) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in a request: the body itself, or each file part of a multipart form."""
    kind = media_type(request.headers.get("content-type"))
    check_content_type(kind)
    body = await read_body(request, limits)
    if not body:
        raise ServeError(400, "empty_body", f"the request body is empty: {SEND_HINT}")
    if kind != MULTIPART:
        return [("body", body)]
    uploads = await form_files(request, body, limits)
    if not uploads:
        raise ServeError(400, "no_image", f"the form holds no file part: {SEND_HINT}")
    return uploads


async def read_body(request: Any, limits: Limits) -> bytes:
    """The whole body, or a 413 as soon as it passes ``limits.max_body_bytes`` (or says it will)."""
    check_declared_length(request.headers.get("content-length"), limits)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_large(size, limits)
        chunks.append(chunk)
    return b"".join(chunks)


async def form_files(request: Any, body: bytes, limits: Limits) -> list[tuple[str, bytes]]:
    """The file parts of a multipart ``body`` already read (parsed by Starlette's python-multipart parser)."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=limits.max_images, max_fields=64,
                                                         max_part_size=limits.max_body_bytes)
    except (MultiPartException, HTTPException) as exc:
        detail = str(getattr(exc, "detail", None) or getattr(exc, "message", None) or exc)
        if "too many files" in detail.lower():
            raise ServeError(413, "too_many_images", f"more than {limits.max_images} images in one request; send "
                                                     f"them in several requests") from None
        raise ServeError(400, "bad_multipart", f"the multipart form cannot be read: {detail}") from None
    try:
        uploads = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if value.content_type:
                    check_content_type(media_type(value.content_type))
                uploads.append((value.filename or key, await value.read()))
        return uploads
    finally:
        await form.close()
