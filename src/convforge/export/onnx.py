"""ONNX export with a parity check against PyTorch, and static int8 quantization with ONNX Runtime."""

from __future__ import annotations

import copy
import io
import json
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from convforge.errors import ConfigError, ConvforgeError
from convforge.fileio import atomic_write, atomic_write_json

DEFAULT_OPSET = 17
PARITY_ATOL = 1e-4


class ParityError(ConvforgeError):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance."""

    exit_code = 5


def _export_to(model: nn.Module, tmp: str, example: torch.Tensor, opset: int, dynamic_batch: bool) -> None:
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    sink = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:  # the TorchScript-based exporter: fast, and dynamic axes by name
            torch.onnx.export(model, (example,), tmp, dynamo=False, **kwargs)
        except Exception as first:  # noqa: BLE001 - fall back to the torch.export-based exporter
            dyn = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},)} if dynamic_batch else {}
            kwargs.pop("dynamic_axes", None)
            try:
                torch.onnx.export(model, (example,), tmp, dynamo=True, external_data=False, **kwargs, **dyn)
            except Exception as second:  # noqa: BLE001
                raise ConvforgeError(
                    f"ONNX export of {type(model).__name__} failed (TorchScript exporter: {type(first).__name__}: "
                    f"{str(first)[:200]}; dynamo exporter: {type(second).__name__}: {str(second)[:200]})"
                ) from None


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU inference session with all graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_session(sess, x: torch.Tensor | np.ndarray) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(array, dtype=np.float32)})[0]


def to_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: Sequence[int],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    meta: dict[str, Any] | None = None,
    check: bool = True,
    atol: float = PARITY_ATOL,
) -> dict[str, Any]:
    """Export ``model`` (eval mode) to ``path`` and write ``path.json``; check ONNX Runtime against PyTorch.

    Returns a report with ``max_abs_diff``. Raises :class:`ParityError` (exit code 5) when the largest
    absolute logit difference on random inputs exceeds ``atol``; the file is kept for inspection.
    """
    if not 7 <= opset <= 23:
        raise ConfigError(f"--opset must be between 7 and 23, got {opset}")
    path = Path(path)
    if path.suffix != ".onnx":
        path = path.with_suffix(".onnx")
    model = copy.deepcopy(model).eval().float()
    example = torch.randn((batch_size, *input_size), generator=torch.Generator().manual_seed(0))
    atomic_write(path, lambda tmp: _export_to(model, tmp, example, opset, dynamic_batch))
    report: dict[str, Any] = {"onnx": str(path), "opset": opset, "dynamic_batch": dynamic_batch,
                              "input_name": "input", "output_name": "logits",
                              "input_shape": ["batch" if dynamic_batch else batch_size, *input_size],
                              "bytes": path.stat().st_size}
    if check:
        report.update(parity(model, path, input_size, batch_size=2 if dynamic_batch else batch_size))
    sidecar = {**(meta or {}), "onnx": report}
    atomic_write_json(sidecar_path(path), sidecar)
    if check and report["max_abs_diff"] > atol:
        raise ParityError(
            f"ONNX Runtime differs from PyTorch on {path}: max absolute logit difference "
            f"{report['max_abs_diff']:.3g} > {atol:g} (file kept for inspection; try another --opset)"
        )
    return report


@torch.no_grad()
def parity(model: nn.Module, path: str | Path, input_size: Sequence[int], batch_size: int = 2,
           trials: int = 3) -> dict[str, Any]:
    """Largest absolute logit difference between PyTorch and ONNX Runtime on random normal inputs."""
    sess = session(path)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(trials):
        x = torch.randn((batch_size, *input_size), generator=gen)
        expected = model(x).float().numpy()
        got = run_session(sess, x)
        if got.shape != expected.shape:
            raise ParityError(f"ONNX Runtime output shape {got.shape} differs from PyTorch's {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return {"max_abs_diff": worst, "parity_inputs": f"{trials} x random normal batch of {batch_size}"}


# ---------------------------------------------------------------- int8


def fold_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with BatchNorm folded into the preceding convolutions."""
    from convforge.layers.fuse import fold_batchnorm

    folded = copy.deepcopy(model).eval()
    if hasattr(folded, "fuse"):
        folded.fuse()
    else:
        fold_batchnorm(folded)
    return folded


class _Reader:
    """ONNX Runtime calibration reader over batches of normalised images."""

    def __init__(self, batches: Iterable[np.ndarray], name: str) -> None:
        self.batches = iter(batches)
        self.name = name

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch}

    def rewind(self) -> None:  # pragma: no cover - only some calibrators call it
        pass


def calibration_batches(calibration: torch.Tensor | None, calib_batch: int = 64) -> list[np.ndarray]:
    """``calibration`` (normalised images, N x C x H x W) as float32 arrays of ``calib_batch`` images."""
    if calibration is None or len(calibration) == 0:
        raise ConfigError("int8 quantization needs calibration images: pass --calib-data SPEC (real images of the "
                          "kind the model will see; their activation ranges set the int8 scales)")
    data = calibration.float().numpy()
    return [data[i:i + calib_batch] for i in range(0, len(data), calib_batch)]


def export_for_quantization(folded: nn.Module, path: Path, input_size: Sequence[int], opset: int,
                            workdir: str | Path) -> tuple[dict[str, Any], Path]:
    """Export the BatchNorm-folded ``folded`` to ``path`` (``*-fp32.onnx``, dynamic batch, parity-checked) and
    run ONNX Runtime's pre-processing (shape inference, recommended by its docs) into ``workdir``; returns the
    export report and the model to quantize (the export itself when pre-processing fails)."""
    fp32 = to_onnx(folded, path, input_size, opset=opset, dynamic_batch=True)
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = Path(workdir) / "pre.onnx"
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
        return fp32, pre
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation, not a requirement
        return fp32, path


def quantize_qdq(source: str | Path, path: str | Path, *, batches: Sequence[np.ndarray] | None = None,
                 cache: str | Path | None = None, calibrate_method: str = "MinMax", per_channel: bool = True,
                 symmetric_activations: bool = False, nodes_to_exclude: Sequence[str] = (),
                 nodes_to_quantize: Sequence[str] = ()) -> None:
    """ONNX Runtime's static QDQ quantization of the fp32 ONNX ``source`` into ``path`` (written atomically):
    int8 weights (symmetric), uint8 activations (int8 symmetric with ``symmetric_activations``).

    Activation ranges come from ``batches`` (ONNX Runtime calibrates with ``calibrate_method``) or from a
    calibration ``cache`` (ONNX Runtime's JSON of tensor ranges; written from ``batches`` when it does not
    exist, read without calibrating when it does)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    options = {"CalibTensorRangeSymmetric": symmetric_activations, "ActivationSymmetric": symmetric_activations,
               # a ReLU folded into its output's uint8 range would vanish with the Q/DQ pair float_inputs removes
               "QDQKeepRemovableActivations": bool(nodes_to_exclude)}

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            quantize_static(str(source), tmp, None if batches is None else _Reader(batches, "input"),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod[calibrate_method],
                            nodes_to_exclude=list(nodes_to_exclude), nodes_to_quantize=list(nodes_to_quantize),
                            calibration_cache_path=None if cache is None else str(cache), extra_options=options)
        if nodes_to_exclude:
            float_inputs(tmp, nodes_to_exclude)

    atomic_write(Path(path), write)


def float_inputs(path: str | Path, nodes: Sequence[str]) -> int:
    """Let each of ``nodes`` of the QDQ model at ``path`` read its activations before quantization (rewritten in
    place): ONNX Runtime keeps an excluded node's weights in float, but still quantizes an input whose producer or
    other readers are int8. Q/DQ pairs and constants left unread are removed; returns the inputs rewired."""
    import onnx  # one graph edit: ONNX Runtime's quantizer has no switch for it

    model = onnx.load(str(path))
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    constants = {init.name for init in graph.initializer}
    wanted, rewired = set(nodes), 0
    for node in graph.node:
        for i, name in enumerate(node.input if node.name in wanted else ()):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in constants:
                node.input[i] = q.input[0]
                rewired += 1
    while True:
        read = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
        unread = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                  and not any(out in read for out in n.output)]
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in read]:
        graph.initializer.remove(init)
    onnx.save(model, str(path))
    return rewired


def quantize_int8(
    model: nn.Module,
    path: str | Path,
    input_size: Sequence[int],
    calibration: torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    per_channel: bool = True,
    calib_batch: int = 64,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Static int8 (QDQ, per-channel int8 weights, uint8 activations) of ``model`` after BatchNorm folding,
    with min-max activation ranges calibrated on ``calibration`` (normalised images, N x C x H x W).

    Writes ``path`` (int8 .onnx) and ``path.json``; returns a report (the fp32 export is kept next to
    it as ``*-fp32.onnx`` for comparison). Other calibration methods, equalization and mixed precision:
    :func:`convforge.compress.quantization.quantize_model`."""
    batches = calibration_batches(calibration, calib_batch)
    path = Path(path).with_suffix(".onnx")
    fp32_path = path.with_name(path.stem + "-fp32.onnx")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmpdir:
        fp32, source = export_for_quantization(fold_for_inference(model), fp32_path, input_size, opset, tmpdir)
        quantize_qdq(source, path, batches=batches, per_channel=per_channel)
    report = {"onnx": str(path), "fp32_onnx": str(fp32_path), "format": "QDQ", "weights": "int8 per-channel"
              if per_channel else "int8 per-tensor", "activations": "uint8 per-tensor (MinMax calibration)",
              "batchnorm_folded": True, "calibration_images": len(calibration), "fp32_parity": fp32["max_abs_diff"],
              "bytes": path.stat().st_size, "fp32_bytes": fp32_path.stat().st_size}
    atomic_write_json(sidecar_path(path), {**(meta or {}), "onnx": report})
    return report


def onnx_top1(path: str | Path, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
              threads: int | None = None) -> float:
    """Top-1 (percent) of an ONNX model on normalised ``images``."""
    sess = session(path, threads)
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = run_session(sess, images[i:i + batch_size])
        correct += int((torch.from_numpy(logits).argmax(1) == labels[i:i + batch_size]).sum())
    return 100.0 * correct / max(len(images), 1)


def sidecar_path(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (never ``model.json``: that is a checkpoint's sidecar)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def sidecar_json(path: str | Path) -> dict[str, Any]:
    return json.loads(sidecar_path(path).read_text())


def score_against_torch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        sessions: dict[str, Any], what: str) -> tuple[dict[str, float], int, torch.Tensor]:
    """Top-1 (%) of the PyTorch ``model`` (key ``top1_torch``) and of each named ONNX Runtime session over
    normalised ``(x, labels)`` batches, one batch at a time; also the image count and the first 256 inputs (for
    timing). ConfigError naming ``what`` when there were no images."""
    correct = dict.fromkeys([*sessions, "top1_torch"], 0)
    seen, kept = 0, []
    model.eval()
    for x, labels in batches:
        with torch.no_grad():
            correct["top1_torch"] += int((model(x).argmax(1) == labels).sum())
        for key, sess in sessions.items():
            correct[key] += int((torch.from_numpy(run_session(sess, x)).argmax(1) == labels).sum())
        seen += len(labels)
        if sum(len(k) for k in kept) < 256:
            kept.append(x[:256])
    if not seen:
        raise ConfigError(f"{what} holds no images to evaluate the exported model on")
    return {key: 100.0 * count / seen for key, count in correct.items()}, seen, torch.cat(kept)[:256]

