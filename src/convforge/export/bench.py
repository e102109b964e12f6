"""Latency and throughput of a model per deployment backend (PyTorch eager or compiled, ONNX Runtime fp32 or
int8) and batch size, measured on this machine."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from convforge.errors import ConfigError, ConvforgeError
from convforge.export.onnx import quantize_int8, run_session, session, to_onnx
from convforge.measure.bench import latency_row, time_fn
from convforge.measure.complexity import count_macs, count_params

BACKENDS = ("torch", "torch-compile", "onnxruntime", "onnxruntime-int8")


def benchmark(
    model: nn.Module,
    input_size: Sequence[int],
    batch_sizes: Sequence[int] = (1, 32, 256),
    backends: Sequence[str] = ("torch", "onnxruntime"),
    *,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    min_seconds: float = 0.0,
    calibration: torch.Tensor | None = None,
    workdir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Params, MACs, and per (backend, batch size): p50/p90 latency after ``warmup`` calls and throughput.

    ``onnxruntime-int8`` quantizes the model statically (QDQ, BatchNorm folded) with ``calibration``
    images, or with random normal inputs when none are given (speed only: the accuracy of such a
    model means nothing, and the report says so).
    """
    input_size = tuple(int(v) for v in input_size)
    for backend in backends:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}: use any of {', '.join(BACKENDS)}")
    for b in batch_sizes:
        if not isinstance(b, int) or b < 1:
            raise ConfigError(f"batch sizes must be integers >= 1, got {b!r}")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    model = model.eval()
    result: dict[str, Any] = {"params": count_params(model), "macs": count_macs(model, input_size),
                              "input_size": list(input_size), "threads": threads or torch.get_num_threads(),
                              "torch": torch.__version__, "rows": [], "notes": []}
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn((b, *input_size), generator=gen) for b in batch_sizes}
    say = log or (lambda _m: None)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for backend in backends:
            runner = _runner(backend, model, input_size, max(batch_sizes), threads, calibration, Path(tmp), result)
            for b in batch_sizes:
                times = time_fn(lambda run=runner, x=inputs[b]: run(x), warmup=warmup, repeats=repeats,
                                min_seconds=min_seconds)
                row = latency_row(backend, b, times)
                say(f"{backend:>17} batch {b:>4}: p50 {row['p50_ms']:.2f} ms  p90 {row['p90_ms']:.2f} ms  "
                    f"{row['images_per_s']:.0f} img/s")
                result["rows"].append(row)
    return result


def _runner(backend: str, model: nn.Module, input_size, max_batch: int, threads: int | None,
            calibration: torch.Tensor | None, tmp: Path, result: dict[str, Any]) -> Callable[[torch.Tensor], Any]:
    if backend == "torch":
        def eager(x: torch.Tensor):
            with torch.inference_mode():
                return model(x)
        return eager
    if backend == "torch-compile":
        try:
            compiled = torch.compile(model)
            with torch.inference_mode():
                compiled(torch.zeros((1, *input_size)))
        except Exception as exc:  # noqa: BLE001 - inductor needs a C++ compiler, among others
            raise ConvforgeError(f"torch.compile failed on this machine ({type(exc).__name__}: {str(exc)[:200]}); "
                                 f"leave torch-compile out of --backend") from None

        def run_compiled(x: torch.Tensor):
            with torch.inference_mode():
                return compiled(x)
        return run_compiled
    if backend == "onnxruntime":
        path = tmp / "model.onnx"
        report = to_onnx(model, path, input_size, dynamic_batch=True)
        result["onnx_parity"] = report["max_abs_diff"]
    else:
        path = tmp / "model-int8.onnx"
        if calibration is None:
            calibration = torch.randn((64, *input_size), generator=torch.Generator().manual_seed(2))
            result["notes"].append("onnxruntime-int8 was calibrated on random inputs: its speed is real, "
                                   "its accuracy is not (use convforge quantize --calib-data for that)")
        quantize_int8(model, path, input_size, calibration)
    sess = session(path, threads)
    return lambda x: run_session(sess, x)
