"""Timing helpers: wall-clock repeats of a call, latency rows, and the parsers of bench-style options."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np
from convforge.errors import ConfigError

def time_fn(fn: Callable[[], Any], warmup: int = 2, repeats: int = 10, min_seconds: float = 0.0) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` calls (more repeats until ``min_seconds``)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def latency_row(backend: str, batch: int, times: list[float]) -> dict[str, Any]:
    p50 = percentile(times, 50)
    return {"backend": backend, "batch": batch, "p50_ms": 1000 * p50, "p90_ms": 1000 * percentile(times, 90),
            "mean_ms": 1000 * statistics.fmean(times), "repeats": len(times), "images_per_s": batch / p50}


def parse_input(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 < v <= 8192 for v in values):
        raise ConfigError(f"--input must be CxHxW with positive sizes (e.g. 3x32x32), got {text!r}")
    return values  # type: ignore[return-value]


def parse_list(text: str, option: str, allowed: Sequence[str] | None = None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{option} needs at least one value")
    if allowed is not None:
        for item in items:
            if item not in allowed:
                raise ConfigError(f"{option}: unknown value {item!r}; use any of {', '.join(allowed)}")
    return items
