"""The browser page at ``/`` (``page.html`` in this package): pick or drop an image, see the top-5 classes as bars
and a Grad-CAM overlay (classifiers on the torch backend), or the mask or upscaled image of a dense model.
Everything is inline: no external script, style sheet or font, so it works offline."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def page_html() -> str:
    """The page's HTML."""
    return resources.files("convforge.serve").joinpath("page.html").read_text(encoding="utf-8")
