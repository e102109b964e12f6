"""What the server runs: a checkpoint in PyTorch eager, or an ONNX model (fp32 or int8) in ONNX Runtime.

:func:`load_served` gives a :class:`Served`: the model's self-description (a checkpoint's metadata, or the
``.onnx.json`` sidecar that ``convforge export``/``quantize`` write) and ``run_batch``, which maps a list of uint8
(C, H, W) views to one output each: class probabilities (classify), ``{"mask", "class_shares"}`` (segment)
or the upscaled uint8 image (super-resolve). Dense tasks run in PyTorch only, image by image at their own size,
through the same functions as ``convforge segment``/``upscale``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from convforge.errors import ConfigError

BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
META_KEYS = ("task", "model", "classes", "input_size", "normalization", "preprocess", "scale", "metrics", "epoch",
             "data", "weights", "image_size")


@dataclass
class Served:
    """A model ready to serve: its metadata, the backend, and ``run_batch`` (views -> outputs)."""

    meta: dict[str, Any]
    label: str
    backend: str
    run_batch: Callable[[list[torch.Tensor]], list[Any]]
    model: torch.nn.Module | None = None  # the PyTorch model (torch backend): what explanations run on
    notes: list[str] = field(default_factory=list)
    workdir: Any = None  # a TemporaryDirectory holding an exported or quantized .onnx, removed by close()

    @property
    def task(self) -> str:
        return self.meta.get("task", "classify")

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes") or [])

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.meta["input_size"])  # type: ignore[return-value]

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        norm = self.meta.get("normalization")
        return (tuple(norm["mean"]), tuple(norm["std"])) if norm else None

    def describe(self) -> dict[str, Any]:
        """The self-description of ``GET /v1/model``: what the checkpoint says about itself, and how it is run."""
        known = {key: self.meta[key] for key in META_KEYS if key in self.meta}
        channels, height, width = self.input_size
        known.setdefault("preprocess", {"resize": [height, width], "crop": [height, width], "crop_pct": 1.0,
                                        "interpolation": "bilinear (shorter side to fit, centre crop)"}
                         if self.task == "classify" else {"resize": None, "note": "images run at their own size"})
        return {"name": (self.meta.get("model") or {}).get("name"), **known, "num_classes": len(self.classes),
                "source": self.label, "backend": self.backend, "explain": self.model is not None and
                self.task == "classify", "notes": list(self.notes)}

    def close(self) -> None:
        """Remove the temporary exported model, if any."""
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


def load_served(source: str | Path | None, backend: str = "torch", *, loaded: Any = None,
                calibration: torch.Tensor | None = None, threads: int | None = None,
                device: str = "cpu") -> Served:
    """``source`` (an ``.onnx`` file) or ``loaded`` (a LoadedModel: checkpoint, registry or foreign weights) as
    a Served model on ``backend``. A checkpoint on ``onnxruntime`` is exported first (parity-checked), on
    ``onnxruntime-int8`` quantized statically with ``calibration`` (normalised images, required)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if source is not None and str(source).endswith(".onnx"):
        if backend == "torch":
            raise ConfigError(f"{source} is an ONNX model: serve it with --backend onnxruntime (or "
                              f"onnxruntime-int8 for an int8 file)")
        return onnx_served(Path(source), backend, threads)
    if loaded is None:
        raise ConfigError("give a checkpoint, a model name or an .onnx file to serve")
    if backend == "torch":
        return torch_served(loaded, device)
    return exported_served(loaded, backend, calibration, threads)


def torch_served(loaded: Any, device: str = "cpu") -> Served:
    """A LoadedModel run in PyTorch eager mode (inference mode, no autograd)."""
    from convforge.train.inference import class_probabilities, segment

    if loaded.task != "super-resolve" and loaded.mean is None:
        raise ConfigError(f"{loaded.label} has no normalisation: pass --mean and --std")
    model = loaded.model.eval()

    def classify(views: list[torch.Tensor]) -> list[Any]:
        with torch.inference_mode():
            return list(class_probabilities(loaded, torch.stack(views), batch_size=len(views), device=device))

    def segment_each(views: list[torch.Tensor]) -> list[Any]:
        with torch.inference_mode():
            return [segment(loaded, view, device=device) for view in views]

    def upscale_each(views: list[torch.Tensor]) -> list[Any]:
        from convforge.data.superres import upscale_rgb

        scale = int(loaded.meta.get("scale") or getattr(model, "scale"))
        upsampled = bool(getattr(model, "upsampled_input", False))
        with torch.inference_mode():
            return [upscale_rgb(model, view, scale, upsampled, device) for view in views]

    runs = {"classify": classify, "segment": segment_each, "super-resolve": upscale_each}
    if loaded.task not in runs:
        raise ConfigError(f"{loaded.label} is a {loaded.task} model: the server runs classify, segment and "
                          f"super-resolve models")
    return Served(dict(loaded.meta), loaded.label, "torch", runs[loaded.task], model, list(loaded.notes))


def exported_served(loaded: Any, backend: str, calibration: torch.Tensor | None, threads: int | None) -> Served:
    """A LoadedModel exported to ONNX (fp32) or quantized to int8 in a temporary folder, then served from there."""
    from convforge.export import quantize_int8, to_onnx

    if loaded.task != "classify":
        raise ConfigError(f"{loaded.label} is a {loaded.task} model: serve dense models with --backend torch")
    if backend == "onnxruntime-int8" and calibration is None:
        raise ConfigError("--backend onnxruntime-int8 on a checkpoint quantizes it and needs calibration images: "
                          "pass --calib-data SPEC, or serve an int8 .onnx written by `convforge quantize`")
    workdir = tempfile.TemporaryDirectory(prefix="convforge-serve-model-")
    meta = dict(loaded.meta)
    path = Path(workdir.name) / "model.onnx"
    try:
        if backend == "onnxruntime":
            to_onnx(loaded.model, path, loaded.input_size, dynamic_batch=True, meta=meta)
        else:
            quantize_int8(loaded.model, path, loaded.input_size, calibration, meta=meta)
        served = onnx_served(path, backend, threads)
    except BaseException:
        workdir.cleanup()
        raise
    served.label, served.workdir = loaded.label, workdir
    served.notes = list(loaded.notes) + served.notes
    return served


def onnx_served(path: Path, backend: str, threads: int | None) -> Served:
    """An ``.onnx`` classifier and its ``.onnx.json`` sidecar in ONNX Runtime (CPU)."""
    from convforge.data import normalize
    from convforge.export.onnx import run_session, session, sidecar_json, sidecar_path

    if not path.is_file():
        raise ConfigError(f"ONNX model not found: {path}")
    try:
        meta = sidecar_json(path)
    except (OSError, ValueError):
        raise ConfigError(f"{path} needs its sidecar {sidecar_path(path)} (written by `convforge export` or "
                          f"`convforge quantize`): it records the classes, input size and normalisation") from None
    missing = [key for key in ("classes", "input_size", "normalization") if not meta.get(key)]
    if missing or meta.get("task", "classify") != "classify":
        raise ConfigError(f"{sidecar_path(path)} does not describe a classifier ({', '.join(missing) or 'task '}"
                          f"{meta.get('task', '')} ...): ONNX serving runs classifiers; serve dense checkpoints "
                          f"with --backend torch")
    int8 = is_int8(path)
    if backend == "onnxruntime-int8" and not int8:
        raise ConfigError(f"{path} is not an int8 model: serve it with --backend onnxruntime, quantize it with "
                          f"`convforge quantize CKPT --calib-data SPEC`, or serve the checkpoint with --backend "
                          f"onnxruntime-int8 --calib-data SPEC")
    sess = session(path, threads)
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    fixed = sess.get_inputs()[0].shape[0]
    chunk = fixed if isinstance(fixed, int) and fixed > 0 else None

    def classify(views: list[torch.Tensor]) -> list[Any]:
        x = normalize(torch.stack(views), mean, std).numpy()
        logits = torch.from_numpy(run_padded(lambda part: run_session(sess, part), x, chunk))
        return list(logits.float().softmax(dim=1))

    meta = {key: value for key, value in meta.items() if key != "onnx"}
    notes = [f"ONNX Runtime {'int8' if int8 else 'fp32'} model {path.name}"]
    return Served(meta, str(path), backend, classify, None, notes)


def run_padded(run: Callable[[Any], Any], x: Any, chunk: int | None) -> Any:
    """``run`` on ``x`` whole (dynamic batch), or in pieces of a model's fixed batch size, the last one padded."""
    import numpy as np

    if chunk is None or len(x) == chunk:
        return run(x)
    parts = []
    for start in range(0, len(x), chunk):
        piece = x[start:start + chunk]
        padded = np.concatenate([piece, np.zeros((chunk - len(piece), *x.shape[1:]), x.dtype)]) \
            if len(piece) < chunk else piece
        parts.append(run(padded)[:len(piece)])
    return np.concatenate(parts)


def is_int8(path: str | Path) -> bool:
    """Whether an ONNX graph is quantized (QDQ or QOperator nodes)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul")
               for node in graph.node)


def top_classes(probabilities: torch.Tensor, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes as ``convforge predict`` lists them: class, index, probability."""
    top = probabilities.topk(min(k, probabilities.shape[0]))
    return [{"class": classes[int(i)], "index": int(i), "probability": float(p)}
            for p, i in zip(top.values, top.indices)]
