"""Measuring models: parameter counts, multiply-accumulates (from ``torch.utils.flop_counter``), timing."""

from convforge.measure.bench import time_fn
from convforge.measure.complexity import count_macs, count_params

__all__ = ["count_macs", "count_params", "time_fn"]
