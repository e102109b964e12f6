"""Quantization beyond min-max int8: calibration, data-free calibration (ZeroQ), sub-8-bit weights (AdaRound)."""

from convforge.compress.quantization.calibration import METHODS, CalibrationSettings
from convforge.compress.quantization.ptq import PTQOptions, prepare, quantize_model

__all__ = ["METHODS", "CalibrationSettings", "PTQOptions", "prepare", "quantize_model"]
