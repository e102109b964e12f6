"""Measuring models: parameter counts and multiply-accumulates (from ``torch.utils.flop_counter``)."""

from convforge.measure.complexity import count_macs, count_params

__all__ = ["count_macs", "count_params"]
