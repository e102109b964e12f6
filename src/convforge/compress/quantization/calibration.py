"""Activation ranges for static int8: min-max, percentile and entropy (KL) from ONNX Runtime's calibrators,
and MSE, a range search on ONNX Runtime's histograms.

Definitions (per tensor, over all calibration images):

- ``minmax``: the smallest and largest value seen;
- ``percentile`` (ONNX Runtime's percentile calibrator): t = the p-th percentile of |x| (from a histogram of
  |x|), range [-t, t] cut to [min, max] (so [0, t] for a ReLU output);
- ``entropy`` (ONNX Runtime's, after TensorRT's KL calibration): the symmetric threshold [-t, t] whose
  128-bin quantized histogram has the smallest KL divergence to the 2048-bin histogram of x, cut to [min, max];
- ``mse``: the clip range alpha * [min(x, 0), max(x, 0)] (symmetric: alpha * [-max|x|, max|x|]) that minimises
  the mean squared error between x and its quantized-dequantized value, over a grid of alpha, computed on the
  histogram (bin centres weighted by counts).

ONNX Runtime's own ``quantize_static`` hands its entropy calibrator 128 bins for 128 quantized bins, which
leaves a single candidate (the full range); the calibrators are driven here with TensorRT's 2048 bins.
"""

from __future__ import annotations

import io
import tempfile
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from convforge.errors import ConfigError

METHODS = ("minmax", "percentile", "entropy", "mse")
HISTOGRAM_BINS = 2048  # TensorRT's histogram size for entropy calibration
QUANTIZED_BINS = 128  # TensorRT's (and ONNX Runtime's) quantized bins for the KL search
MSE_BINS = 8192  # fine enough that even a quarter of the range resolves every uint8 step
MSE_GRID = 100  # candidate clip ranges alpha = 1/100 .. 100/100 of the observed range


@dataclass(frozen=True)
class CalibrationSettings:
    """How activation ranges are found: ``method`` from :data:`METHODS`; ``percentile`` for the percentile
    method; ``symmetric``: int8 activations with zero point 0 (default: uint8, asymmetric)."""

    method: str = "minmax"
    percentile: float = 99.999
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--calib-method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.percentile <= 100:
            raise ConfigError(f"--calib-percentile must be in (0, 100], got {self.percentile:g} (e.g. 99.99)")

    def as_dict(self) -> dict[str, Any]:
        """JSON form for the sidecar (the percentile only where it applies)."""
        out = asdict(self)
        if self.method != "percentile":
            out.pop("percentile")
        return out


def ort_method(method: str) -> str:
    """The ``CalibrationMethod`` member whose name the calibration cache of ``method`` carries (MSE ranges are
    plain min/max pairs)."""
    return {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy", "mse": "MinMax"}[method]


def quantization_grid(lo: float, hi: float, symmetric: bool) -> tuple[float, int, int, int]:
    """ONNX Runtime's activation parameters for the range [lo, hi]: (scale, zero point, qmin, qmax); the range
    is widened to hold 0; uint8 [0, 255] asymmetric or int8 [-127, 127] symmetric."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        bound = max(-lo, hi)
        qmin, qmax = -127, 127
        scale = 2 * bound / (qmax - qmin)
        return (scale if scale > 0 else 1.0), 0, qmin, qmax
    qmin, qmax = 0, 255
    scale = (hi - lo) / (qmax - qmin)
    if scale <= 0:
        return 1.0, 0, qmin, qmax
    return scale, int(round(qmin - lo / scale)), qmin, qmax


def fake_quantize(values: np.ndarray, lo: float, hi: float, symmetric: bool = False) -> np.ndarray:
    """``values`` quantized to the int8/uint8 grid of [lo, hi] (see :func:`quantization_grid`) and back."""
    scale, zero, qmin, qmax = quantization_grid(lo, hi, symmetric)
    q = np.clip(np.round(values / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def mse_candidates(lowest: float, highest: float, symmetric: bool, bin_width: float,
                   grid: int = MSE_GRID) -> list[tuple[float, float]]:
    """The clip ranges the MSE search tries: alpha * [min(lowest, 0), max(highest, 0)] (symmetric: alpha times
    [-m, m], m = max |x|) for alpha = k / grid, keeping those whose quantization step is at least one
    histogram bin (a coarser histogram cannot tell their rounding error); always the full range."""
    lo, hi = min(float(lowest), 0.0), max(float(highest), 0.0)
    if symmetric:
        bound = max(-lo, hi)
        lo, hi = -bound, bound
    levels = 254 if symmetric else 255
    out = []
    for k in range(1, grid + 1):
        a, b = lo * k / grid, hi * k / grid
        if (b - a) / levels >= bin_width or k == grid:
            out.append((a, b))
    return out


def mse_range(counts: np.ndarray, edges: np.ndarray, lowest: float, highest: float, *,
              symmetric: bool = False, grid: int = MSE_GRID) -> tuple[float, float]:
    """The candidate clip range (:func:`mse_candidates`) with the smallest mean squared quantization error of
    the histogram ``counts`` over ``edges`` (values at bin centres, weighted by counts)."""
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    if counts.sum() <= 0 or highest <= lowest:
        return float(min(lowest, 0.0)), float(max(highest, 0.0))
    keep = counts > 0
    centres, weights = ((edges[:-1] + edges[1:]) / 2)[keep], counts[keep]
    best, best_error = None, np.inf
    for lo, hi in mse_candidates(lowest, highest, symmetric, float(edges[1] - edges[0]), grid):
        error = float(np.sum(weights * (fake_quantize(centres, lo, hi, symmetric) - centres) ** 2))
        if error < best_error:
            best, best_error = (lo, hi), error
    return best


class _OneBatch:
    """A calibration reader holding one batch: calibrators see the data batch by batch (bounded memory)."""

    def __init__(self, name: str, batch: np.ndarray) -> None:
        self.item: dict[str, np.ndarray] | None = {name: batch}

    def get_next(self) -> dict[str, np.ndarray] | None:
        item, self.item = self.item, None
        return item


def _calibrator(source: Path, settings: CalibrationSettings, workdir: str):
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    op_types = sorted(set(QDQRegistry) | set(QLinearOpsRegistry))  # what quantize_static calibrates
    method, options = {
        "minmax": (CalibrationMethod.MinMax, {"symmetric": settings.symmetric}),
        "percentile": (CalibrationMethod.Percentile, {"num_bins": HISTOGRAM_BINS, "percentile": settings.percentile,
                                                      "symmetric": True}),
        "entropy": (CalibrationMethod.Entropy, {"num_bins": HISTOGRAM_BINS, "num_quantized_bins": QUANTIZED_BINS}),
        "mse": (CalibrationMethod.Entropy, {"num_bins": MSE_BINS, "num_quantized_bins": QUANTIZED_BINS}),
    }[settings.method]
    return create_calibrator(source, op_types, augmented_model_path=str(Path(workdir) / "augmented.onnx"),
                             calibrate_method=method, extra_options=options)


def calibrate(source: str | Path, batches: Iterable[np.ndarray], settings: CalibrationSettings,
              input_name: str = "input"):
    """ONNX Runtime ``TensorsData`` of every tensor ``quantize_static`` quantizes in the fp32 ONNX ``source``,
    by ``settings.method`` over ``batches`` (float32 arrays)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    with tempfile.TemporaryDirectory(prefix="convforge-calib-") as workdir, redirect_stdout(io.StringIO()):
        calibrator = _calibrator(Path(source), settings, workdir)
        seen = 0
        for batch in batches:
            calibrator.collect_data(_OneBatch(input_name, np.ascontiguousarray(batch, dtype=np.float32)))
            seen += len(batch)
        if not seen:
            raise ConfigError("calibration needs at least one image (--calib-samples)")
        if settings.method != "mse":
            return calibrator.compute_data()
        ranges = {}
        for name, (counts, edges, lowest, highest, *_) in calibrator.collector.histogram_dict.items():
            lo, hi = mse_range(counts, edges, float(lowest), float(highest), symmetric=settings.symmetric)
            ranges[name] = TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
        return TensorsData(CalibrationMethod.MinMax, ranges)


def tensor_ranges(data) -> dict[str, tuple[float, float]]:
    """``{tensor: (low, high)}`` of ONNX Runtime ``TensorsData``."""
    return {name: (float(np.min(value.range_value[0])), float(np.max(value.range_value[1])))
            for name, value in data.data.items()}


def write_cache(data, path: str | Path) -> Path:
    """Save ``TensorsData`` as ONNX Runtime's calibration cache (``quantize_static(calibration_cache_path=)``
    reads it instead of calibrating)."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    save_tensors_data(data, Path(path))
    return Path(path)
