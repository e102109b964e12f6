"""Saliency maps of classifiers: which pixels a prediction rests on, and checks that the maps are faithful.

The Python API::

    from convforge.inspect.saliency import explain, METHODS, overlay, deletion_insertion, randomisation_check

    maps = explain(model, normalised_images, "gradcam")       # (N, H, W); target=None: the predicted class

Methods: ``gradcam``, ``gradcam++`` and ``fullgrad`` (own code), ``ig`` (integrated gradients) and
``occlusion`` (captum). The command line: ``convforge explain``.
"""

from convforge.inspect.saliency.attribution import integrated_gradients, occlusion
from convforge.inspect.saliency.cams import gradcam, gradcam_pp
from convforge.inspect.saliency.decomposition import fullgrad, fullgrad_decomposition, layer_bias
from convforge.inspect.saliency.faithfulness import (
                                                     deletion_insertion,
                                                     gaussian_blur,
                                                     parameterised_layers,
                                                     randomisation_check,
                                                     randomise_top_layers,
                                                     spearman,
)
from convforge.inspect.saliency.hooks import default_layer, feature_layers, prepared
from convforge.inspect.saliency.registry import ALIASES, LAYER_METHODS, METHODS, explain, method_name, parse_methods
from convforge.inspect.saliency.render import grid, overlay, write_grid, write_png

__all__ = ["ALIASES", "LAYER_METHODS", "METHODS", "default_layer", "deletion_insertion", "explain",
           "feature_layers", "fullgrad", "fullgrad_decomposition", "gaussian_blur", "gradcam", "gradcam_pp", "grid",
           "integrated_gradients", "layer_bias", "method_name", "occlusion", "overlay", "parameterised_layers",
           "parse_methods", "prepared", "randomisation_check", "randomise_top_layers", "spearman", "write_grid",
           "write_png"]
