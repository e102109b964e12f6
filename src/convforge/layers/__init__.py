"""Small reusable layers shared by the model families."""

from convforge.layers.blur_pool import BlurPool, binomial_filter
from convforge.layers.conv_norm_act import ConvNormAct
from convforge.layers.dcls import DclsConv2d
from convforge.layers.stochastic_depth import DropPath, drop_path, linear_drop_path_rates
from convforge.layers.fuse import fold_batchnorm, fold_conv_bn
from convforge.layers.channel_rounding import make_divisible
from convforge.layers.reparam_large_kernel import ReparamLargeKernelConv
from convforge.layers.spd_conv import SpaceToDepth, SPDConv, space_to_depth
from convforge.layers.squeeze_excite import SqueezeExcite

__all__ = [
    "BlurPool",
    "ConvNormAct",
    "DclsConv2d",
    "DropPath",
    "ReparamLargeKernelConv",
    "SPDConv",
    "SpaceToDepth",
    "SqueezeExcite",
    "binomial_filter",
    "drop_path",
    "fold_batchnorm",
    "fold_conv_bn",
    "linear_drop_path_rates",
    "make_divisible",
    "space_to_depth",
]
