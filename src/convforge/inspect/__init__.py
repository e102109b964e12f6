"""Inspect trained convolution filters: extraction, quality metrics, distribution shift, a filter database.

The Python API::

    from convforge.inspect import extract_filters, layer_metrics, distribution_shift, FilterDB, filter_health

The command line: ``convforge filters``.
"""

from convforge.inspect.db import FilterDB
from convforge.inspect.filters import ConvLayer, Filters, conv_layers, extract_filters
from convforge.inspect.metrics import (
                                       METRIC_KEYS,
                                       THRESHOLDS,
                                       filter_health,
                                       flags,
                                       layer_metrics,
                                       summarize,
                                       weight_metrics,
)
from convforge.inspect.shift import distribution_shift, shift_details, shift_matrix

__all__ = ["METRIC_KEYS", "THRESHOLDS", "ConvLayer", "FilterDB", "Filters", "conv_layers", "distribution_shift",
           "extract_filters", "filter_health", "flags", "layer_metrics", "shift_details", "shift_matrix",
           "summarize", "weight_metrics"]
