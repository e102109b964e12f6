"""Uploads to the uint8 (C, H, W) views the model sees, decoded exactly as ``convforge predict`` decodes files.

An upload passes the header checks of :mod:`convforge.serve.limits`, is written to a private temporary file and
goes through the same functions as the offline prediction (:func:`convforge.train.inference.load_images`, or
:func:`convforge.data.photos.photo_view` when the checkpoint records a resize + centre-crop ``preprocess``):
one preprocessing, not a second one to keep in step.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from convforge.data.dataset import convert_channels
from convforge.errors import DataError
from convforge.serve.errors import ServeError
from convforge.serve.limits import Limits, image_header, is_array, read_array


class Preprocessor:
    """Turns one upload (bytes) into the model's input view; thread-safe (one temporary file per call)."""

    def __init__(self, meta: dict[str, Any], limits: Limits, workdir: str | Path) -> None:
        self.task = meta.get("task", "classify")
        self.input_size = tuple(int(v) for v in meta["input_size"])
        self.preprocess = meta.get("preprocess")
        self.limits = limits
        self.workdir = str(workdir)

    def __call__(self, data: bytes, name: str) -> torch.Tensor:
        """The view of upload ``name``: classify at the model's size and channels; dense tasks at the image's
        own size, as ``convforge segment``/``upscale`` see it. Bad uploads raise a ServeError (4xx)."""
        if is_array(data):
            return self._array_view(read_array(data, name), name)
        image_header(data, name, self.limits)
        handle, path = tempfile.mkstemp(dir=self.workdir, suffix=".upload")
        try:
            with os.fdopen(handle, "wb") as sink:
                sink.write(data)
            return self._file_view(path, name)
        except DataError as exc:  # the offline decoder's words, with the upload's name for the temporary path
            message = str(exc).replace(path, name).replace("cannot read image ", "")
            raise ServeError(400, "corrupt_image", message) from None
        finally:
            os.unlink(path)

    def _file_view(self, path: str, name: str) -> torch.Tensor:
        from convforge.train.inference import load_images

        channels, height, width = self.input_size
        if self.task != "classify":
            return load_images([path])[0]
        if self.preprocess:  # trained on image stores: the evaluation view (aspect kept, resize + centre crop)
            from convforge.data.photos import photo_view

            return photo_view(path, self.preprocess, channels)
        image = load_images([path], (height, width))[0]
        return self._channels(image, name)

    def _array_view(self, array: Any, name: str) -> torch.Tensor:
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
        channels, height, width = self.input_size
        if self.task != "classify":
            return image
        if tuple(image.shape[1:]) != (height, width):
            raise ServeError(400, "wrong_size", f"{name} is {image.shape[1]}x{image.shape[2]} pixels; arrays are "
                                                f"not resized: send {height}x{width}, or an image file (resized as "
                                                f"the checkpoint records)")
        return self._channels(image, name)

    def _channels(self, image: torch.Tensor, name: str) -> torch.Tensor:
        channels = self.input_size[0]
        try:
            return convert_channels(image[None], channels)[0]
        except ValueError:
            raise ServeError(400, "wrong_channels", f"{name} has {image.shape[0]} channels and the model takes "
                                                    f"{channels}; only 1 <-> 3 channels are converted") from None


def scratch_dir() -> tempfile.TemporaryDirectory:
    """A private temporary folder for uploads, in memory (/dev/shm) where the system has one."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix="convforge-serve-", dir=base)
