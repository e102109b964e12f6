"""Small reusable layers shared by the model families."""

from convforge.layers.conv_norm_act import ConvNormAct
from convforge.layers.drop_path import DropPath, drop_path, linear_drop_path_rates
from convforge.layers.fuse import fold_batchnorm, fold_conv_bn
from convforge.layers.squeeze_excite import SqueezeExcite

__all__ = [
    "ConvNormAct",
    "DropPath",
    "SqueezeExcite",
    "drop_path",
    "fold_batchnorm",
    "fold_conv_bn",
    "linear_drop_path_rates",
]
