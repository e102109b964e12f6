"""Channel rounding shared by the mobile families (MobileNetV2/V3, EfficientNet, RegNet)."""

from __future__ import annotations


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``, default ``divisor``),
    never going more than 10% below ``value``: the rule of the TensorFlow MobileNet reference code."""
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded
