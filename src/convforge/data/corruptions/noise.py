"""Noise corruptions: gaussian_noise, shot_noise, impulse_noise (float output in [0, 255])."""

from __future__ import annotations

from typing import Any

import numpy as np

from convforge.data.corruptions._ops import Options


def _per_image(rngs: list[np.random.Generator], draw: Any) -> np.ndarray:
    """Stack one draw per image, each from that image's generator."""
    return np.stack([draw(rng) for rng in rngs])


def gaussian_noise(x: np.ndarray, c: float, rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Add N(0, c^2) noise to intensities in [0, 1]."""
    shape = x.shape[1:]
    noise = _per_image(rngs, lambda rng: rng.normal(size=shape, scale=c))
    return np.clip(x / 255.0 + noise, 0, 1) * 255


def shot_noise(x: np.ndarray, c: float, rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Poisson noise: each intensity becomes Poisson(c * x) / c."""
    lam = x / 255.0 * c
    counts = np.stack([rng.poisson(lam[i]) for i, rng in enumerate(rngs)])
    return np.clip(counts / c, 0, 1) * 255


def impulse_noise(x: np.ndarray, c: float, rngs: list[np.random.Generator], opts: Options) -> np.ndarray:
    """Salt and pepper: each value is hit with probability c, then set to 1 or 0 with equal odds.

    This is scikit-image's ``random_noise(mode='s&p', amount=c)`` that the reference calls.
    """
    shape = x.shape[1:]
    draws = _per_image(rngs, lambda rng: rng.random((2, *shape)))
    hit, salt = draws[:, 0] < c, draws[:, 1] < 0.5
    out = x / 255.0
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out * 255
