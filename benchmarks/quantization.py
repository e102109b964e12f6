"""Post-training int8 quantization with ONNX Runtime on CIFAR-10-JPEG: calibration methods and mixed precision.

Model: the reference ResNet-56 of ../shared/reference-weights (akamaster/pytorch_resnet_cifar10, trained on the
original CIFAR-10 with ImageNet mean/std), evaluated on the 10,000 JPEG re-encoded test images with ONNX
Runtime. The code path is `convforge quantize`'s (:func:`convforge.compress.quantization.quantize_model`),
called once per configuration with the data loaded once; calibration on 512 seeded train images (the
command's default):

1. ``calibration``: fp32 vs int8 top-1 for each calibration method (minmax, percentile 99.999, entropy, mse),
   per-channel int8 weights, uint8 activations;
2. ``max_drop``: --max-drop P (default 0.2 points, min-max): the layers ranked by sensitivity and the fewest
   kept in float;
3. ``per_tensor``: per-tensor int8 weights (min-max), plain, with --equalize, and with --bias-correction too;
4. ``zeroq``: int8 calibrated on the real train images vs on ZeroQ distilled images (data-free, --zeroq-samples);
5. ``w4``: W4A8, 4-bit per-channel weights by round-to-nearest vs AdaRound (--adaround-iterations), uint8
   activations through ONNX Runtime, and the storage of the packed 4-bit weights.

Prints a Markdown table per section (nothing is written to RESULTS.md):

    python benchmarks/quantization.py [--sections calibration,max_drop,per_tensor,zeroq,w4] [--threads 2]
        [--eval-samples N] [--zeroq-samples 32] [--adaround-iterations 500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, extracted, machine  # noqa: E402

from convforge.compress.quantization import CalibrationSettings, PTQOptions, quantize_model  # noqa: E402
from convforge.compress.quantization.sensitivity import keep_in_float  # noqa: E402
from convforge.data import load, normalize  # noqa: E402
from convforge.export import onnx_top1  # noqa: E402
from convforge.models import create_model, load_foreign_weights  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what the reference weights were trained with
WEIGHTS = SHARED / "reference-weights" / "resnet56-4bfd9763.th"
SIZE = (3, 32, 32)


@dataclass
class Bench:
    """The model, calibration images, test images and labels, shared by the sections."""

    model: torch.nn.Module
    calibration: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    work: Path
    threads: int
    max_drop: float
    zeroq_samples: int = 32
    adaround_iterations: int = 500

    def top1(self, path: str | Path) -> float:
        return onnx_top1(path, self.x, self.y, threads=self.threads)


def prepare(work: Path, args: argparse.Namespace) -> Bench:
    """The reference ResNet-56, 512 seeded train images (as `convforge quantize --calib-samples 512` picks them)
    and the test split, normalised with ImageNet statistics."""
    data = load(f"imagefolder:{extracted('cifar10-jpeg.tar.gz', 'cifar10-jpeg')}", log=print)
    model = create_model("resnet56", num_classes=10)
    load_foreign_weights(model, WEIGHTS)
    pick = torch.randperm(len(data.train.labels), generator=torch.Generator().manual_seed(0))[:args.calib_samples]
    count = args.eval_samples or len(data.test.labels)
    return Bench(model.eval(), normalize(data.train.images[pick], MEAN, STD),
                 normalize(data.test.images[:count], MEAN, STD), data.test.labels[:count], work, args.threads,
                 args.max_drop, args.zeroq_samples, args.adaround_iterations)


def calibration(bench: Bench) -> list[str]:
    """fp32 vs int8 top-1 for each calibration method (per-channel weights)."""
    lines = ["| calibration | fp32 top-1 (ONNX) | int8 top-1 | change (points) | wall s |", "|---|---:|---:|---:|---:|"]
    fp32 = None
    for method in ("minmax", "percentile", "entropy", "mse"):
        start = time.perf_counter()
        report = quantize_model(bench.model, bench.work / f"resnet56-{method}.onnx", SIZE, bench.calibration,
                                PTQOptions(CalibrationSettings(method)))
        fp32 = fp32 if fp32 is not None else bench.top1(report["fp32_onnx"])  # the same fp32 model every time
        int8 = bench.top1(report["onnx"])
        lines.append(f"| {method} | {fp32:.2f}% | {int8:.2f}% | {int8 - fp32:+.2f} | "
                     f"{time.perf_counter() - start:.0f} |")
        print(lines[-1], flush=True)
    return lines


def max_drop(bench: Bench) -> list[str]:
    """--max-drop: the most sensitive layers and the fewest kept in float (min-max, per-channel)."""
    start = time.perf_counter()
    step = keep_in_float(bench.calibration.numpy(), max_drop=bench.max_drop, evaluate=bench.top1,
                         threads=bench.threads)
    report = quantize_model(bench.model, bench.work / "resnet56-maxdrop.onnx", SIZE, bench.calibration, then=step)
    mixed, ranked = report["mixed_precision"], report["sensitivity"]["layers"]
    floats = ", ".join(layer["layer"] for layer in mixed["float_layers"]) or "none"
    lines = [f"--max-drop {bench.max_drop:g}: fp32 {mixed['fp32_top1']:.2f}%, int8 {mixed['top1_int8']:.2f}% "
             f"(drop {mixed['drop']:+.2f} points, {'met' if mixed['met'] else 'NOT met'}); "
             f"{len(mixed['float_layers'])} layer(s) in float: {floats}; {len(mixed['trials'])} trial(s), "
             f"{time.perf_counter() - start:.0f} s in all.", "",
             f"| most sensitive layers (alone in int8, {report['sensitivity']['images']} images) | relative output "
             f"error | SQNR dB |", "|---|---:|---:|"]
    return lines + [f"| {r['layer']} | {r['error']:.2e} | {r['sqnr_db']:.1f} |" for r in ranked[:5]]


def per_tensor(bench: Bench) -> list[str]:
    """Per-tensor int8 weights (min-max), plain, cross-layer equalized, and equalized with bias correction."""
    lines = ["| weights | fp32 top-1 (ONNX) | int8 top-1 | change (points) | range balance | wall s |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, options in (("per-tensor", PTQOptions(per_channel=False)),
                           ("per-tensor, --equalize", PTQOptions(per_channel=False, equalize=True)),
                           ("per-tensor, --equalize --bias-correction",
                            PTQOptions(per_channel=False, equalize=True, bias_correction=True))):
        start = time.perf_counter()
        report = quantize_model(bench.model, bench.work / "resnet56-per-tensor.onnx", SIZE, bench.calibration, options)
        fp32, int8 = bench.top1(report["fp32_onnx"]), bench.top1(report["onnx"])
        eq = report.get("equalization")
        balance = f"{eq['range_balance_before']:.2f} -> {eq['range_balance_after']:.2f}" if eq else "-"
        lines.append(f"| {label} | {fp32:.2f}% | {int8:.2f}% | {int8 - fp32:+.2f} | {balance} | "
                     f"{time.perf_counter() - start:.0f} |")
        print(lines[-1], flush=True)
    return lines


def zeroq(bench: Bench) -> list[str]:
    """int8 (min-max, per-channel) calibrated on the real train images vs on ZeroQ distilled images (no data:
    N(0, 1) inputs optimised for 500 Adam steps so that each BatchNorm's input matches its running statistics)."""
    from convforge.compress.quantization.zeroq import ITERATIONS, distill_calibration_images, zeroq_loss

    start = time.perf_counter()
    distilled = distill_calibration_images(bench.model, bench.zeroq_samples, SIZE, seed=0)
    distil_s = time.perf_counter() - start
    noise = torch.randn((len(distilled), *SIZE), generator=torch.Generator().manual_seed(0))
    lines = ["| calibration images | fp32 top-1 (ONNX) | int8 top-1 | change (points) | wall s |",
             "|---|---:|---:|---:|---:|"]
    for label, images, extra_s in ((f"real: {len(bench.calibration)} train images", bench.calibration, 0.0),
                                   (f"ZeroQ: {len(distilled)} distilled, {ITERATIONS} steps (no data)", distilled,
                                    distil_s)):
        start = time.perf_counter()
        report = quantize_model(bench.model, bench.work / "resnet56-zeroq.onnx", SIZE, images)
        fp32, int8 = bench.top1(report["fp32_onnx"]), bench.top1(report["onnx"])
        lines.append(f"| {label} | {fp32:.2f}% | {int8:.2f}% | {int8 - fp32:+.2f} | "
                     f"{time.perf_counter() - start + extra_s:.0f} |")
        print(lines[-1], flush=True)
    return lines + ["", f"ZeroQ objective (BN statistics distance): {zeroq_loss(bench.model, noise):.1f} for N(0, 1) "
                        f"noise, {zeroq_loss(bench.model, distilled):.1f} for the distilled images."]


def w4(bench: Bench) -> list[str]:
    """W4A8: 4-bit per-channel weights (the first conv and the classifier stay 8-bit) by round-to-nearest and by
    AdaRound (on the first 256 calibration images), exported as int4 QDQ with uint8 activations (min-max, all 512
    calibration images) and run by ONNX Runtime, which dequantizes int4 weights to a float Conv: storage, not speed."""
    from convforge.compress.quantization.adaround import adaround_quantize, quantize_weights_nearest
    from convforge.compress.quantization.grid_onnx import export_grid_qdq
    from convforge.export import to_onnx
    from convforge.export.onnx import fold_for_inference

    fp32_path = bench.work / "resnet56-w4-fp32.onnx"
    to_onnx(fold_for_inference(bench.model), fp32_path, SIZE, dynamic_batch=True)
    fp32 = bench.top1(fp32_path)
    lines = ["| weights | top-1 (ONNX Runtime) | change (points) | weight storage | int4 .onnx | wall s |",
             "|---|---:|---:|---:|---:|---:|", f"| fp32 | {fp32:.2f}% | - | {fp32_path.stat().st_size / 1e6:.2f} MB "
             f"(.onnx) | - | - |"]
    for label, method in (("W4A8 round-to-nearest", lambda: quantize_weights_nearest(bench.model, 4,
                                                                                       example=bench.calibration[:1])),
                          (f"W4A8 AdaRound ({bench.adaround_iterations} it/layer)",
                           lambda: adaround_quantize(bench.model, bench.calibration[:256], 4,
                                                     iterations=bench.adaround_iterations, seed=0))):
        start = time.perf_counter()
        model, report = method()
        exported = export_grid_qdq(model, report, bench.work / "resnet56-w4.onnx", SIZE, bench.calibration)
        top1 = bench.top1(exported["onnx"])
        lines.append(f"| {label} | {top1:.2f}% | {top1 - fp32:+.2f} | {report['quantized_bytes'] / 1e6:.3f} MB packed "
                     f"(fp32 {report['fp32_bytes'] / 1e6:.2f} MB) | {exported['bytes'] / 1e6:.2f} MB | "
                     f"{time.perf_counter() - start:.0f} |")
        print(lines[-1], flush=True)
    return lines


SECTIONS: dict[str, Callable[[Bench], list[str]]] = {"calibration": calibration, "max_drop": max_drop,
                                                      "per_tensor": per_tensor, "zeroq": zeroq, "w4": w4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated from {', '.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, help="evaluate on the first N test images (default: all)")
    parser.add_argument("--max-drop", type=float, default=0.2)
    parser.add_argument("--zeroq-samples", type=int, default=32, help="ZeroQ distilled images (default: 32)")
    parser.add_argument("--adaround-iterations", type=int, default=500, help="AdaRound steps per layer (default: 500)")
    parser.add_argument("--work", help="folder for the ONNX files (default: a temporary one)")
    args = parser.parse_args()
    names = args.sections.split(",")
    if unknown := [n for n in names if n not in SECTIONS]:
        raise SystemExit(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if not WEIGHTS.is_file():
        raise SystemExit(f"{WEIGHTS} not found: the benchmark needs ../shared/reference-weights")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="convforge-quant-bench-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        bench = prepare(work, args)
        for name in names:
            lines = SECTIONS[name](bench)
            print(f"\n### ResNet-56 int8 ({name}), CIFAR-10-JPEG test ({len(bench.y)} images)\nMachine: {machine()}\n\n"
                  + "\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
