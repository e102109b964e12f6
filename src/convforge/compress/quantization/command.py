"""``convforge quantize`` after its arguments are read: quantize a loaded model, score fp32 against int8 on an
evaluation split, time both, and print the tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from convforge.compress.quantization.ptq import PTQOptions, quantize_model
from convforge.compress.quantization.sensitivity import keep_in_float
from convforge.errors import ConfigError


def _normalised_batches(loaded: Any, data: Any, split: str, batch_size: int, limit: int | None,
                        notes: list[str]):
    from convforge.data import normalize
    from convforge.train.inference import eval_views, normalization_for

    mean, std = normalization_for(loaded, data, notes)
    for images, labels in eval_views(loaded, data, split, notes, batch_size=batch_size, limit=limit):
        yield normalize(images, mean, std), labels


def onnx_evaluator(loaded: Any, data: Any, split: str, *, batch_size: int = 256, limit: int | None = None,
                   threads: int | None = None) -> Callable[[Path], float]:
    """``evaluate(onnx path) -> top-1 (percent)`` on the (first ``limit`` images of the) split, its normalised
    images held in memory so that the ``--max-drop`` search scores many models on the same images."""
    from convforge.export.onnx import run_session, session

    batches = list(_normalised_batches(loaded, data, split, batch_size, limit, []))
    if not batches:
        raise ConfigError(f"the {split} split of {data.spec} holds no images to evaluate the int8 model on")
    total = sum(len(labels) for _, labels in batches)

    def evaluate(path: Path) -> float:
        sess = session(path, threads)
        correct = sum(int((torch.from_numpy(run_session(sess, x)).argmax(1) == y).sum()) for x, y in batches)
        return 100.0 * correct / total

    return evaluate


def quantized_top1(loaded: Any, data: Any, report: dict[str, Any], split: str, *, batch_size: int = 256,
                   limit: int | None = None, threads: int | None = None) -> tuple[dict, torch.Tensor]:
    """Top-1 of the fp32 and int8 ONNX models and of PyTorch on the (first ``limit`` images of the) split, one
    batch at a time (the split is never held in memory whole), and the first 256 normalised images (for
    timing)."""
    from convforge.export.onnx import score_against_torch, session

    sessions = {"top1_fp32": session(report["fp32_onnx"], threads), "top1_int8": session(report["onnx"], threads)}
    batches = _normalised_batches(loaded, data, split, batch_size, limit, [])
    scores, seen, kept = score_against_torch(loaded.model, batches, sessions, f"the {split} split of {data.spec}")
    return {"eval": {"data": data.spec, "split": split, "images": seen}, **scores}, kept


def quantized_speed(loaded: Any, report: dict[str, Any], x: torch.Tensor, threads: int | None) -> dict[str, float]:
    """Images per second at batch 256: PyTorch eager fp32, ONNX Runtime fp32 and int8."""
    from convforge.export.onnx import run_session, session
    from convforge.measure.bench import time_fn

    batch = x[:256] if len(x) >= 256 else x.repeat((256 + len(x) - 1) // len(x), 1, 1, 1)[:256]
    speed = {}
    for name, fn in (("torch eager fp32", lambda: loaded.model(batch)),
                     ("onnxruntime fp32", (lambda s: lambda: run_session(s, batch))(session(report["fp32_onnx"], threads))),
                     ("onnxruntime int8", (lambda s: lambda: run_session(s, batch))(session(report["onnx"], threads)))):
        with torch.inference_mode():
            times = time_fn(fn, warmup=2, repeats=5)
        speed[name] = 256 / sorted(times)[len(times) // 2]
    return speed


def quantize_loaded(loaded: Any, size: tuple[int, ...], calibration: torch.Tensor, data: Any, out: Path,
                    options: PTQOptions, *, split: str = "test", eval_samples: int | None = None,
                    batch_size: int = 256, threads: int | None = None, sensitivity: bool = False,
                    max_drop: float | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize ``loaded`` with ``options`` (ranking the layers with ``sensitivity``, keeping the fewest in float
    for a top-1 drop within ``max_drop`` points on ``split`` of ``data``); then score and time it."""
    then = None
    if sensitivity or max_drop is not None:
        evaluate = None
        if max_drop is not None:
            evaluate = onnx_evaluator(loaded, data, split, batch_size=batch_size, limit=eval_samples, threads=threads)
        then = keep_in_float(calibration.float().numpy(), max_drop=max_drop, evaluate=evaluate, threads=threads,
                             log=log)
    report = quantize_model(loaded.model, out, size, calibration, options, meta=dict(loaded.meta), then=then)
    scores, x = quantized_top1(loaded, data, report, split, batch_size=batch_size, limit=eval_samples,
                               threads=threads)
    report.update(scores)
    report["images_per_s_batch256"] = speed = quantized_speed(loaded, report, x, threads)
    report["speedup_int8_vs_torch"] = speed["onnxruntime int8"] / speed["torch eager fp32"]
    return report


def report_tables(report: dict[str, Any], calib_spec: str, top: int = 10) -> list[tuple[str, list[tuple[str, str]]]]:
    """(title, rows) of the summary table and, when ranked, of the most sensitive layers."""
    rows = [("int8 model", report["onnx"]),
            ("calibration", f"{report['calibration']['method']} on {report['calibration_images']} images from "
                            f"{calib_spec}; weights {report['weights']}, activations {report['activations']}"),
            ("top-1 fp32 (ONNX)", f"{report['top1_fp32']:.2f}%  (PyTorch {report['top1_torch']:.2f}%)"),
            ("top-1 int8", f"{report['top1_int8']:.2f}%  ({report['top1_int8'] - report['top1_fp32']:+.2f} points, "
                           f"{report['eval']['images']} {report['eval']['split']} images)"),
            ("size", f"{report['bytes'] / 1e6:.2f} MB (fp32 {report['fp32_bytes'] / 1e6:.2f} MB)"),
            *[(f"{k} (batch 256)", f"{v:.0f} img/s") for k, v in report["images_per_s_batch256"].items()]]
    mixed = report.get("mixed_precision")
    if mixed:
        names = ", ".join(layer["layer"] for layer in mixed["float_layers"]) or "none"
        rows.append(("kept in float", f"{len(mixed['float_layers'])} layer(s) ({names}): drop {mixed['drop']:+.2f} "
                                      f"points, {'within' if mixed['met'] else 'NOT within'} --max-drop "
                                      f"{mixed['max_drop']:g}"))
    tables = [("int8 quantization (ONNX Runtime, QDQ)", rows)]
    if "sensitivity" in report:
        ranked = report["sensitivity"]["layers"]
        tables.append((f"most sensitive layers (relative output error with the layer alone in int8, "
                       f"{report['sensitivity']['images']} images)",
                       [(r["layer"], f"{r['error']:.3g}  ({r['sqnr_db']:.1f} dB)") for r in ranked[:top]]))
    return tables


def quantize_weights_4bit(loaded: Any, size: tuple[int, ...], calibration: torch.Tensor, data: Any, out: Path, *,
                          rounding: str = "adaround", iterations: int | None = None, split: str = "test",
                          eval_samples: int | None = None, batch_size: int = 256,
                          threads: int | None = None) -> dict[str, Any]:
    """W4A8: per-channel 4-bit weights (first conv and classifier 8-bit) by AdaRound or round-to-nearest on
    ``calibration``, exported as int4 QDQ with uint8 activations; top-1 of PyTorch fp32 and of the W4 model on
    ``split``, and the packed storage. No speed is reported: ONNX Runtime runs int4 Conv by dequantizing it."""
    from convforge.compress.quantization.adaround import ITERATIONS, adaround_quantize, quantize_weights_nearest
    from convforge.compress.quantization.grid_onnx import export_grid_qdq
    from convforge.export.onnx import score_against_torch, session

    if rounding == "adaround":
        model, grid = adaround_quantize(loaded.model, calibration, 4, iterations=iterations or ITERATIONS, seed=0)
    elif rounding == "nearest":
        model, grid = quantize_weights_nearest(loaded.model, 4, example=calibration[:1].float())
    else:
        raise ConfigError(f"--rounding must be adaround or nearest, got {rounding!r}")
    report = export_grid_qdq(model, grid, out, size, calibration, weights="int4")
    batches = _normalised_batches(loaded, data, split, batch_size, eval_samples, [])
    scores, seen, _ = score_against_torch(loaded.model, batches, {"top1_w4": session(report["onnx"], threads)},
                                          f"the {split} split of {data.spec}")
    storage = {k: grid[k] for k in ("packed_weight_bytes", "scale_bytes", "bias_bytes", "quantized_bytes",
                                    "fp32_bytes")}
    return {**report, "rounding": rounding, "eval": {"data": data.spec, "split": split, "images": seen}, **scores,
            "storage": storage, "layers": grid["layers"]}


def w4_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary table of :func:`quantize_weights_4bit`."""
    storage = report["storage"]
    return [("W4A8 model", report["onnx"]), ("rounding", report["rounding"]),
            ("top-1 fp32 (PyTorch)", f"{report['top1_torch']:.2f}%"),
            ("top-1 W4A8 (ONNX Runtime)", f"{report['top1_w4']:.2f}%  ({report['top1_w4'] - report['top1_torch']:+.2f} "
                                          f"points, {report['eval']['images']} {report['eval']['split']} images)"),
            ("weight storage", f"{storage['quantized_bytes'] / 1e6:.3f} MB packed (fp32 {storage['fp32_bytes'] / 1e6:.3f} "
                               "MB); no speed-up: ONNX Runtime dequantizes int4 Conv weights to float")]
