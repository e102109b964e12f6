"""File names in messages: any name a Linux file system can hold, printable without a UnicodeEncodeError."""

from __future__ import annotations

import os


def printable(path: str | os.PathLike) -> str:
    """``path`` as text that encodes to UTF-8: bytes that are not UTF-8 (held by Python as surrogate
    escapes, e.g. ``b"\\xff.png"`` read as ``"\\udcff.png"``) are shown as ``\\xff``."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
