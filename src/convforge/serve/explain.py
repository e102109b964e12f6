"""Grad-CAM overlays for ``POST /v1/explain``: :mod:`convforge.inspect.saliency` on a private copy of the model,
so that its hooks never meet the batches the server is running at the same time."""

from __future__ import annotations

import copy
import threading
from typing import Any

import numpy as np
import torch

from convforge.serve.backends import Served
from convforge.serve.errors import ServeError


class Explainer:
    """Grad-CAM of a served PyTorch classifier, one explanation at a time."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self._model: torch.nn.Module | None = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self.served.model is not None and self.served.task == "classify"

    def check(self) -> None:
        """A 404 that says why when this model cannot be explained."""
        if not self.available:
            raise ServeError(404, "explain_unavailable", f"Grad-CAM needs a classifier served with --backend torch "
                                                         f"(this is a {self.served.task} model on "
                                                         f"{self.served.backend})")

    def __call__(self, view: torch.Tensor, target: int | None = None) -> tuple[bytes, dict[str, Any]]:
        """The overlay PNG of one uint8 (C, H, W) view (the predicted class, or ``target``) and what it shows."""
        from convforge.data import normalize
        from convforge.inspect.saliency import explain, overlay
        from convforge.serve.responses import png

        self.check()
        mean, std = self.served.normalization  # type: ignore[misc]
        with self._lock:
            if self._model is None:
                self._model = copy.deepcopy(self.served.model).eval()
            x = normalize(view[None], mean, std)
            with torch.no_grad():
                predicted = int(self._model(x).argmax(1)[0])
            cls = predicted if target is None else target
            saliency = explain(self._model, x, "gradcam", target=cls)[0]
        picture = overlay(view.permute(1, 2, 0).numpy(), saliency.numpy())
        return png(np.asarray(picture)), {"class": self.served.classes[cls], "index": cls, "method": "gradcam"}
