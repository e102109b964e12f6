"""Quantization beyond min-max int8: calibration, data-free calibration (ZeroQ), sub-8-bit weights (AdaRound)."""
