"""ONNX QDQ export of a model whose conv/linear weights already lie on per-channel grids (AdaRound or
round-to-nearest, :mod:`convforge.compress.quantization.adaround`), with int8 activations from ONNX Runtime's
static quantization (min-max calibration).

The weights keep exactly their grid: each weight tensor is quantized with its own per-channel scales and zero point
0 (ONNX Runtime's ``TensorQuantOverrides``), as int4 (opset 21, DequantizeLinear of int4) or int8 (the grid's
integers, which fit in int8). ONNX Runtime 1.32 on the CPU runs both; for int4 weights it dequantizes and runs a
float Conv (it has no int4 convolution kernel), so int4 saves storage only; int8 weights fuse into QLinearConv.
"""

from __future__ import annotations

import copy
import io
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from convforge.errors import ConfigError, ConvforgeError
from convforge.fileio import atomic_write

OPSET = 21
FORMATS = ("int4", "int8")


def _export_fp32(model: nn.Module, path: str, input_size: Sequence[int]) -> None:
    import onnx
    from onnx import version_converter

    example = torch.zeros((1, *input_size))
    sink = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
        warnings.simplefilter("ignore")
        # The TorchScript exporter stops at opset 20: export at 17, then convert (int4 Q/DQ needs opset 21).
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.save(version_converter.convert_version(onnx.load(path), OPSET), path)


def _weight_overrides(onnx_path: str, model: nn.Module, report: dict[str, Any], weights: str) -> dict[str, list]:
    """ONNX Runtime TensorQuantOverrides: each grid layer's weight initializer with its own per-channel scales."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType

    qtype = QuantType.QInt4 if weights == "int4" else QuantType.QInt8
    modules = dict(model.named_modules())
    grids = [(modules[e["name"]].weight.detach().cpu().numpy(), e) for e in report["layers"]]
    graph = onnx.load(onnx_path).graph
    initializers = {init.name: init for init in graph.initializer}
    overrides: dict[str, list] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        array = numpy_helper.to_array(initializers[node.input[1]])
        match = next((e for w, e in grids if w.shape == array.shape and np.array_equal(w, array)), None)
        if match is None:
            continue
        layer_type = qtype if match["bits"] <= 4 else QuantType.QInt8  # a layer kept at 8 bits stays int8
        overrides[node.input[1]] = [{"axis": 0, "quant_type": layer_type, "scale": np.float32(s),
                                     "zero_point": np.int8(0)} for s in match["scale"]]
    if len(overrides) != len(grids):
        raise ConvforgeError(f"only {len(overrides)} of the {len(grids)} grid layers were found as Conv/Gemm "
                             "weights in the ONNX export; their grids cannot be kept exactly")
    return overrides


class _Reader:
    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = iter(batches)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch}


def export_grid_qdq(model: nn.Module, report: dict[str, Any], path: str | Path, input_size: Sequence[int],
                    calibration: torch.Tensor, *, weights: str = "int4", calib_batch: int = 64) -> dict[str, Any]:
    """Write ``path`` (.onnx, QDQ): ``model``'s grid weights exactly (``weights`` "int4" or "int8"), uint8
    activations calibrated (min-max) on ``calibration`` (normalised images). ``report`` is the one that
    :func:`~convforge.compress.quantization.adaround.adaround_quantize` or ``quantize_weights_nearest`` returned.
    Returns the file's size and the largest difference between its dequantized weights and ``model``'s."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if weights not in FORMATS:
        raise ConfigError(f"grid weights export as int4 or int8, got {weights!r}")
    if calibration is None or len(calibration) == 0:
        raise ConfigError("int8 activations need calibration images (normalised, N x C x H x W)")
    path = Path(path).with_suffix(".onnx")
    model = copy.deepcopy(model).eval().float().cpu()
    data = calibration.float().cpu().numpy()
    batches = [data[i:i + calib_batch] for i in range(0, len(data), calib_batch)]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmpdir:
        fp32 = str(Path(tmpdir) / "fp32.onnx")
        _export_fp32(model, fp32, input_size)
        options = {"CalibTensorRangeSymmetric": False,
                   "TensorQuantOverrides": _weight_overrides(fp32, model, report, weights)}

        def write(tmp: str) -> None:
            with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                quantize_static(fp32, tmp, _Reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax, extra_options=options)

        atomic_write(path, write)
    return {"onnx": str(path), "opset": OPSET, "weights": f"{weights} per-channel (grid kept exactly)",
            "activations": "uint8 per-tensor (MinMax calibration)", "calibration_images": len(data),
            "bytes": path.stat().st_size, "weight_max_abs_diff": weight_difference(path, model, report)}


def weight_difference(path: str | Path, model: nn.Module, report: dict[str, Any]) -> float:
    """Largest absolute difference between the dequantized weights in the ONNX file and ``model``'s grid weights."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    dequantized = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in values and values[node.input[0]].ndim > 1:
            q, scale = values[node.input[0]].astype(np.float64), values[node.input[1]].astype(np.float64)
            zero = values[node.input[2]].astype(np.float64) if len(node.input) > 2 else 0.0
            shape = (-1,) + (1,) * (q.ndim - 1)
            dequantized.append((q - np.reshape(zero, shape)) * np.reshape(scale, shape))
    modules = dict(model.named_modules())
    worst = 0.0
    for entry in report["layers"]:
        w = modules[entry["name"]].weight.detach().cpu().numpy().astype(np.float64)
        diffs = [float(np.abs(d - w).max()) for d in dequantized if d.shape == w.shape]
        if not diffs:
            raise ConvforgeError(f"layer {entry['name']}: no quantized weight of shape {w.shape} in {path}")
        worst = max(worst, min(diffs))
    return worst
