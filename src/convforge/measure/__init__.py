"""Measuring models: parameter counts, multiply-accumulates (from ``torch.utils.flop_counter``), speed."""

from convforge.measure.bench import BACKENDS, benchmark
from convforge.measure.complexity import count_macs, count_params

__all__ = ["BACKENDS", "benchmark", "count_macs", "count_params"]
