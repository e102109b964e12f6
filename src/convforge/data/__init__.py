"""Data: dataset specs, the decoding cache, and batch loaders with tensor augmentations."""

from convforge.data.dataset import Dataset, Split, channel_stats
from convforge.data.loader import AUGMENTS, BatchLoader, normalize
from convforge.data.spec import load, parse_spec

__all__ = ["AUGMENTS", "BatchLoader", "Dataset", "Split", "channel_stats", "load", "normalize", "parse_spec"]
