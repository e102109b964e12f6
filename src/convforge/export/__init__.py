"""Deployment: ONNX export checked against PyTorch, static int8 with ONNX Runtime, per-backend benchmarks."""

from convforge.export.bench import BACKENDS, benchmark
from convforge.export.onnx import (
    ParityError,
    fold_for_inference,
    onnx_top1,
    quantize_int8,
    session,
    to_onnx,
)

__all__ = ["BACKENDS", "ParityError", "benchmark", "fold_for_inference", "onnx_top1", "quantize_int8", "session",
           "to_onnx"]
