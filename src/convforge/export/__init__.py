"""Deployment: ONNX export checked against PyTorch, static int8 with ONNX Runtime."""

from convforge.export.onnx import (
    ParityError,
    fold_for_inference,
    onnx_top1,
    quantize_int8,
    session,
    to_onnx,
)

__all__ = ["ParityError", "fold_for_inference", "onnx_top1", "quantize_int8", "session", "to_onnx"]
