"""Compression: structured pruning (channels removed physically), global magnitude pruning, int8."""

from convforge.compress.pruning import METHODS, STRUCTURED, PruneResult, prune
from convforge.models.widths import apply_widths

__all__ = ["METHODS", "STRUCTURED", "PruneResult", "apply_widths", "prune"]
