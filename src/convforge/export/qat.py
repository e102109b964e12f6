"""ONNX export of models trained quantized: quantization-aware (``--qat int8``) and binary (``--binary``).

- QAT: ONNX QDQ (QuantizeLinear/DequantizeLinear, opset >= 13): the TorchScript exporter turns each
  ``fake_quantize_per_channel_affine`` (weights, axis 0) and ``fake_quantize_per_tensor_affine``
  (activations, uint8) into a Q/DQ pair; the weights are then stored as int8 initializers (the values
  torch's fake quantization rounds them to), so the file is about a quarter of the float one. ONNX
  Runtime fuses the pattern into QLinearConv / QLinearAdd and runs it in int8; BatchNorm is folded.
- Binary: a float ONNX model with the binarised weights baked in (exactly +-alpha per output channel) and
  the input signs as ``Where(x >= 0, 1, -1)``; it runs in any ONNX runtime at float speed (no int8 or
  bit-packed kernels: nothing is claimed about speed).

The parity report compares ONNX Runtime with the PyTorch model (the fake-quantized one for QAT) on random
normal inputs: the largest absolute logit difference and the top-1 agreement. ONNX Runtime's int8 kernels
round the bias and requantize with their own arithmetic, so an intermediate value may land one
quantization step away from PyTorch's; the logits then differ slightly, while top-1 agrees.
"""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from convforge.errors import ConfigError, ConvforgeError
from convforge.export.onnx import run_session, score_against_torch, session, sidecar_path, to_onnx
from convforge.fileio import atomic_write, atomic_write_json
from convforge.layers.fake_quant import ActivationFakeQuant, activation_export_module
from convforge.train.qat import META_KEY

QDQ_MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis) need opset 13
DEFAULT_OPSET = 17


def is_trained_quantized(meta: dict[str, Any]) -> bool:
    """The checkpoint metadata ``meta`` is of a --qat or --binary run."""
    return isinstance(meta.get(META_KEY), dict)


def export_module(model: nn.Module, quantized: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` ready for tracing: each quantized layer in its export form (constants
    for weights, scales and biases), or with ``quantized=False`` the float model the weights make (BatchNorm
    folded, no rounding; binary layers keep their binarisation)."""
    copied = copy.deepcopy(model).eval()
    replaced: list[str] = []
    for name, module in list(copied.named_modules()):
        if not name or any(name.startswith(prefix + ".") for prefix in replaced):
            continue
        if isinstance(module, ActivationFakeQuant):
            new = activation_export_module(module) if quantized else nn.Identity()
        elif quantized or not hasattr(module, "float_module"):
            new = module.export_module() if hasattr(module, "export_module") else None
        else:
            new = module.float_module()
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(copied.get_submodule(parent) if parent else copied, attr, new)
            replaced.append(name)
    return copied.eval()


def _export(model: nn.Module, tmp: str, example: torch.Tensor, opset: int) -> None:
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        # The TorchScript exporter: it maps torch's fake quantization to QuantizeLinear/DequantizeLinear.
        torch.onnx.export(model, (example,), tmp, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _constant(graph: Any, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def store_int8_weights(proto: Any) -> int:
    """Replace each QuantizeLinear of a constant (the weights) by its integer result, computed as torch's fake
    quantization rounds; returns how many tensors were replaced."""
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    done = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in initializers:
            continue
        weight = torch.from_numpy(numpy_helper.to_array(initializers[node.input[0]]).copy())
        scale, zero = _constant(graph, node.input[1]), _constant(graph, node.input[2])
        if scale is None or zero is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        info = np.iinfo(zero.dtype)
        shape = [1] * weight.dim()
        if scale.size > 1:
            shape[axis] = -1
        scale_t = torch.from_numpy(scale.astype(np.float32)).reshape(shape)
        zero_t = torch.from_numpy(zero.astype(np.int32)).reshape(shape)
        if scale.size > 1:
            fake = torch.fake_quantize_per_channel_affine(weight, scale_t.flatten(), zero_t.flatten(), axis,
                                                          int(info.min), int(info.max))
        else:
            fake = torch.fake_quantize_per_tensor_affine(weight, float(scale), int(zero), int(info.min), int(info.max))
        integers = (torch.round(fake / scale_t) + zero_t).clamp(int(info.min), int(info.max))
        graph.initializer.append(numpy_helper.from_array(integers.numpy().astype(zero.dtype), node.output[0]))
        graph.node.remove(node)
        done += 1
    used = {name for node in graph.node for name in node.input}
    for init in list(graph.initializer):
        if init.name not in used and init.name not in {o.name for o in graph.output}:
            graph.initializer.remove(init)
    return done


@torch.no_grad()
def compare(model: nn.Module, path: str | Path, input_size: Sequence[int], batch_size: int = 8,
            trials: int = 4) -> dict[str, Any]:
    """ONNX Runtime against ``model`` (eval mode) on random normal inputs: largest absolute and median logit
    difference, and the share of inputs whose top-1 class agrees."""
    sess = session(path)
    generator = torch.Generator().manual_seed(1)
    diffs, agree, seen = [], 0, 0
    model.eval()
    for _ in range(trials):
        x = torch.randn((batch_size, *input_size), generator=generator)
        expected = model(x).float().numpy()
        got = run_session(sess, x)
        if got.shape != expected.shape:
            raise ConvforgeError(f"ONNX Runtime output shape {got.shape} differs from PyTorch's {expected.shape}")
        diffs.append(np.abs(got - expected).ravel())
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        seen += len(x)
    every = np.concatenate(diffs)
    return {"max_abs_diff": float(every.max()), "median_abs_diff": float(np.median(every)),
            "top1_agreement": agree / max(seen, 1), "parity_inputs": f"{trials} x random normal batch of {batch_size}"}


def export_quantized(model: nn.Module, path: str | Path, input_size: Sequence[int], *, opset: int = DEFAULT_OPSET,
                     meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export a --qat (int8 QDQ) or --binary (float, binarised weights) model to ``path`` and its float twin
    next to it (``*-fp32.onnx``: the same weights without rounding); write ``path.json``; return a report
    with the parity of ONNX Runtime against ``model``."""
    import onnx

    record = (meta or {}).get(META_KEY) or {}
    kind = record.get("kind")
    if kind not in ("qat", "binary"):
        raise ConfigError("export_quantized takes a --qat or --binary model (its checkpoint records 'quantization'); "
                          "quantize a float model with convforge quantize --calib-data")
    if kind == "qat" and opset < QDQ_MIN_OPSET:
        raise ConfigError(f"per-channel QDQ needs --opset >= {QDQ_MIN_OPSET}, got {opset}")
    path = Path(path) if str(path).endswith(".onnx") else Path(path).with_suffix(".onnx")
    example = torch.randn((1, *input_size), generator=torch.Generator().manual_seed(0))
    exported = export_module(model)

    def write(tmp: str) -> None:
        _export(exported, tmp, example, opset)
        proto = onnx.load(tmp)
        if kind == "qat":
            store_int8_weights(proto)
        onnx.save(proto, tmp)

    atomic_write(path, write)
    report: dict[str, Any] = {
        "onnx": str(path), "fp32_onnx": None, "kind": kind, "opset": opset,
        "format": "QDQ" if kind == "qat" else "float (binarised weights)",
        "weights": record.get("weights"), "activations": record.get("activations"),
        "batchnorm_folded": kind == "qat", "bytes": path.stat().st_size, "fp32_bytes": None}
    if kind == "qat":  # the float model these weights make, for comparison (a binary model has no such twin)
        fp32_path = path.with_name(path.stem + "-fp32.onnx")
        to_onnx(export_module(model, quantized=False), fp32_path, input_size, opset=opset, dynamic_batch=True,
                meta=meta, check=False)
        report.update(fp32_onnx=str(fp32_path), fp32_bytes=fp32_path.stat().st_size)
    report.update(compare(model, path, input_size))
    atomic_write_json(sidecar_path(path), {**(meta or {}), "onnx": report})
    return report


def quantize_trained(loaded: Any, input_size: Sequence[int], out: str | Path, data: Any = None, *,
                     split: str = "test", eval_samples: int | None = None, batch_size: int = 256,
                     threads: int | None = None) -> dict[str, Any]:
    """``convforge quantize`` of a --qat or --binary checkpoint (``loaded``: a LoadedModel): no calibration,
    :func:`export_quantized`, then, with ``data``, top-1 on ``split`` of PyTorch (the fake-quantized or binary
    model), of the exported model and of the float twin, and throughput at batch 256."""
    report = export_quantized(loaded.model, out, input_size, meta=dict(loaded.meta))
    report["notes"] = ["trained quantized checkpoint: exported with its own ranges and weights, no calibration"]
    if data is not None:
        scores, x = _top1(loaded, data, report, split, eval_samples, batch_size, threads)
        report.update(scores)
        report["images_per_s_batch256"] = speed = _speed(loaded, report, x, threads)
        report["speedup_onnx_vs_torch_fp32"] = speed["onnxruntime " + _onnx_name(report)] / speed["torch eager fp32"]
    return report


def _onnx_name(report: dict[str, Any]) -> str:
    return "int8" if report["kind"] == "qat" else "binary (float)"


def _top1(loaded: Any, data: Any, report: dict[str, Any], split: str, eval_samples: int | None, batch_size: int,
          threads: int | None) -> tuple[dict[str, Any], torch.Tensor]:
    """Top-1 of PyTorch, the exported model and (QAT) its float twin on ``split``; the first 256 inputs."""
    from convforge.data import normalize
    from convforge.train.inference import eval_views, normalization_for

    mean, std = normalization_for(loaded, data, [])
    sessions = {"top1_onnx": session(report["onnx"], threads)}
    if report["fp32_onnx"]:
        sessions["top1_fp32"] = session(report["fp32_onnx"], threads)
    batches = ((normalize(images, mean, std), labels) for images, labels in
               eval_views(loaded, data, split, [], batch_size=batch_size, limit=eval_samples or None))
    scores, seen, kept = score_against_torch(loaded.model, batches, sessions, f"the {split} split of {data.spec}")
    if report["kind"] == "qat":
        scores["top1_int8"] = scores["top1_onnx"]
    return {"eval": {"data": data.spec, "split": split, "images": seen}, **scores}, kept


def _speed(loaded: Any, report: dict[str, Any], x: torch.Tensor, threads: int | None) -> dict[str, float]:
    """Images per second at batch 256: PyTorch eager on the float twin (the float model the weights make;
    a binary model's float form), ONNX Runtime on the exported model and (QAT) on the float twin."""
    from convforge.measure.bench import time_fn

    batch = x[:256] if len(x) >= 256 else x.repeat((256 + len(x) - 1) // len(x), 1, 1, 1)[:256]
    twin = export_module(loaded.model, quantized=False)
    runners = {"torch eager fp32": lambda: twin(batch)}
    if report["fp32_onnx"]:
        fp32 = session(report["fp32_onnx"], threads)
        runners["onnxruntime fp32"] = lambda: run_session(fp32, batch)
    exported = session(report["onnx"], threads)
    runners["onnxruntime " + _onnx_name(report)] = lambda: run_session(exported, batch)
    speed = {}
    for name, fn in runners.items():
        with torch.inference_mode():
            times = time_fn(fn, warmup=2, repeats=5)
        speed[name] = 256 / sorted(times)[len(times) // 2]
    return speed


def report_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of ``convforge quantize``'s table for a trained quantized checkpoint."""
    name = _onnx_name(report)
    rows = [(f"{name} model", report["onnx"]), ("format", f"{report['format']} (opset {report['opset']})"),
            ("parity (random inputs)", f"max |logit diff| {report['max_abs_diff']:.3g}, top-1 agreement "
                                       f"{100 * report['top1_agreement']:.1f}%")]
    if "top1_torch" in report:
        rows.append(("top-1 PyTorch", f"{report['top1_torch']:.2f}%  ({report['eval']['images']} "
                                      f"{report['eval']['split']} images)"))
        change = report["top1_onnx"] - report["top1_torch"]
        rows.append((f"top-1 ONNX {name}", f"{report['top1_onnx']:.2f}%  ({change:+.2f} points vs PyTorch)"))
        if "top1_fp32" in report:
            rows.append(("top-1 float twin (ONNX)", f"{report['top1_fp32']:.2f}%  (same weights, no rounding)"))
    size = f"{report['bytes'] / 1e6:.2f} MB"
    rows.append(("size", size + (f" (fp32 {report['fp32_bytes'] / 1e6:.2f} MB)" if report["fp32_bytes"] else "")))
    rows += [(f"{k} (batch 256)", f"{v:.0f} img/s") for k, v in report.get("images_per_s_batch256", {}).items()]
    return rows
