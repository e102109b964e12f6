"""Small reusable layers shared by the model families."""

from convforge.layers.conv_norm_act import ConvNormAct

__all__ = ["ConvNormAct"]
