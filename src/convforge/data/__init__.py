"""Data: dataset specs, the decoding cache, and batch loaders with tensor augmentations."""

from convforge.data.dataset import Dataset, Split, channel_stats
from convforge.data.loader import AUGMENTS, BatchLoader, normalize
from convforge.data.spec import load, parse_spec
from convforge.data.store import ImageStore, build_store, open_store

__all__ = [
    "AUGMENTS", "BatchLoader", "Dataset", "ImageStore", "Split", "build_store", "channel_stats", "load", "normalize",
    "open_store", "parse_spec",
]
