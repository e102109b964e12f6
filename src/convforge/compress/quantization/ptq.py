"""Post-training static int8 with ONNX Runtime: BatchNorm folding, optional cross-layer equalization and bias
correction, a calibration method, per-channel or per-tensor weights, and layers kept in float.

:func:`prepare` does the expensive part once (fold, export, calibrate into ONNX Runtime's calibration cache);
:meth:`Prepared.quantize` then writes int8 models from the cache without calibrating again (the sensitivity
analysis and the ``--max-drop`` search write many).
"""

from __future__ import annotations

import copy
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from convforge.compress.quantization.calibration import (
    CalibrationSettings,
    calibrate,
    ort_method,
    tensor_ranges,
    write_cache,
)
from convforge.compress.quantization.equalize import correct_bias, equalize
from convforge.export.onnx import (
    DEFAULT_OPSET,
    calibration_batches,
    export_for_quantization,
    fold_for_inference,
    quantize_qdq,
    sidecar_path,
)
from convforge.fileio import atomic_write_json
from convforge.models.widths import is_depthwise


@dataclass(frozen=True)
class PTQOptions:
    """Settings of :func:`quantize_model`: calibration, weight granularity, equalization, bias correction."""

    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    per_channel: bool = True
    equalize: bool = False
    bias_correction: bool = False
    opset: int = DEFAULT_OPSET
    calib_batch: int = 64

    def describe(self) -> dict[str, Any]:
        """JSON form for reports and sidecars."""
        activations = "int8 symmetric" if self.calibration.symmetric else "uint8 asymmetric"
        return {"calibration": self.calibration.as_dict(), "weights": "int8 per-channel" if self.per_channel
                else "int8 per-tensor", "activations": f"{activations} per-tensor ({self.calibration.method})",
                "equalize": self.equalize, "bias_correction": self.bias_correction}


def advice(model: nn.Module, options: PTQOptions) -> list[str]:
    """Warnings for combinations known to misbehave on this model, each with what to do instead."""
    depthwise = any(isinstance(m, nn.Conv2d) and is_depthwise(m) for m in model.modules())
    notes = []
    if depthwise and not options.per_channel and not options.equalize:
        notes.append("per-tensor int8 weights on depthwise convolutions after BatchNorm folding are known to "
                     "collapse accuracy (quantization whitepaper: MobileNetV2 71.9% -> 0.1%); use per-channel "
                     "weights (drop --per-tensor) or add --equalize")
    if options.calibration.method == "entropy":
        known = ("it has collapsed depthwise networks with folded BatchNorm in published comparisons "
                 "(EfficientNet-Lite0 75% -> 31%, min-max kept 75%)" if depthwise else
                 "its thresholds often clip ReLU outputs far below their maximum (the reference ResNet-56 on "
                 "CIFAR-10-JPEG: 83.2% -> 77.0%, min-max 83.2%)")
        notes.append(f"entropy (KL) calibration: {known}; check the int8 top-1, or use --calib-method minmax or mse")
    if options.equalize and not depthwise and options.per_channel:
        notes.append("--equalize mainly helps per-tensor weights (depthwise networks); per-channel weights already "
                     "give every output channel its own range")
    return notes


@dataclass
class Prepared:
    """A model ready to quantize: the fp32 reference export, the ONNX to quantize, the calibration cache."""

    options: PTQOptions
    fp32_path: Path
    source: Path
    cache: Path
    report: dict[str, Any]

    def quantize(self, path: str | Path, *, exclude: Sequence[str] = (), only: Sequence[str] = ()) -> Path:
        """Write the int8 model to ``path`` from the cached ranges; ``exclude``: ONNX node names kept in float;
        ``only``: quantize these nodes alone (the sensitivity analysis)."""
        quantize_qdq(self.source, path, cache=self.cache, calibrate_method=ort_method(self.options.calibration.method),
                     per_channel=self.options.per_channel, symmetric_activations=self.options.calibration.symmetric,
                     nodes_to_exclude=exclude, nodes_to_quantize=only)
        return Path(path)


def _float_model(model: nn.Module, options: PTQOptions, calibration: torch.Tensor) -> tuple[nn.Module, nn.Module,
                                                                                             dict[str, Any]]:
    """The fp32 reference (folded, equalized) and the model to quantize (bias-corrected when asked)."""
    reference = fold_for_inference(model).float()
    report: dict[str, Any] = {}
    if options.equalize:
        report["equalization"] = equalize(reference)
    target = reference
    if options.bias_correction:
        target = copy.deepcopy(reference)
        report["bias_correction"] = {"kind": "empirical (input means of the calibration images)",
                                     **correct_bias(target, calibration, per_channel=options.per_channel)}
    return reference, target, report


@contextmanager
def prepare(model: nn.Module, path: str | Path, input_size: Sequence[int], calibration: torch.Tensor,
            options: PTQOptions = PTQOptions()) -> Iterator[Prepared]:
    """Fold (equalize, bias-correct), export the fp32 reference next to ``path`` (``*-fp32.onnx``) and calibrate;
    the working files live until the ``with`` block ends."""
    batches = calibration_batches(calibration, options.calib_batch)
    path = Path(path).with_suffix(".onnx")
    fp32_path = path.with_name(path.stem + "-fp32.onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".convforge-ptq-") as tmp:
        with torch.no_grad():
            reference, target, report = _float_model(model, options, calibration)
        fp32, source = export_for_quantization(reference, fp32_path, input_size, options.opset, tmp)
        if target is not reference:
            work = Path(tmp) / "corrected"
            work.mkdir()
            _, source = export_for_quantization(target, work / "corrected-fp32.onnx", input_size, options.opset, work)
        ranges = calibrate(source, batches, options.calibration)
        cache = write_cache(ranges, Path(tmp) / "calibration.json")
        report.update({"fp32_parity": fp32["max_abs_diff"], "calibration_images": len(calibration),
                       "activation_ranges": tensor_ranges(ranges), "notes": advice(model, options)})
        yield Prepared(options, fp32_path, source, cache, report)


def quantize_model(model: nn.Module, path: str | Path, input_size: Sequence[int], calibration: torch.Tensor,
                   options: PTQOptions = PTQOptions(), *, meta: dict[str, Any] | None = None,
                   then: Callable[[Prepared, Path], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Static int8 of ``model`` (QDQ for ONNX Runtime) with ``options``; writes ``path`` and ``path.json``.

    ``then(prepared, path)``, if given, runs after the first int8 model is written and while the calibration
    cache exists (e.g. :func:`convforge.compress.quantization.sensitivity.keep_in_float`); what it returns is
    merged into the report (it may rewrite ``path``). Returns the report, also written to the sidecar."""
    path = Path(path).with_suffix(".onnx")
    with prepare(model, path, input_size, calibration, options) as prepared:
        prepared.quantize(path)
        extra = then(prepared, path) if then else {}
        report = {"onnx": str(path), "fp32_onnx": str(prepared.fp32_path), "format": "QDQ", **options.describe(),
                  "batchnorm_folded": True, **prepared.report, **extra}
    report.update({"bytes": path.stat().st_size, "fp32_bytes": prepared.fp32_path.stat().st_size})
    atomic_write_json(sidecar_path(path), {**(meta or {}), "onnx": report})
    return report
