"""Quantization-aware training and binary networks on CIFAR-10-JPEG (issue 19, items 3 and 6).

1. QAT: MobileNetV2-CIFAR trained in fp32 (``--fp32-epochs``), post-training int8 of it (per-channel min-max,
   ONNX Runtime, for reference), then ``convforge train --init FP32 --qat int8`` (``--qat-epochs``, cosine from
   ``--qat-lr``), exported to ONNX QDQ: top-1 of fp32, PTQ int8, QAT fake-quant (PyTorch) and QAT int8 (ONNX
   Runtime) on the test split, and throughput at batch 256: ONNX Runtime int8 against PyTorch eager fp32.
2. Binary: ResNet-20 with binary weights and activations, with binary weights only, and its fp32 twin, all three
   with the same budget (``--binary-epochs``, AdamW, cosine; first and last layer full precision); top-1 of each
   and the gap to the twin; the binary-activation model is exported and run by ONNX Runtime (float, binarised
   weights: storage and speed are not those of a bit-packed kernel). ``--binary-init-epochs K`` trains each
   binary network in two steps within the same budget (K epochs with real weights, then binary weights too).

A run directory under --work that already holds a completed run with the same options is reused, so a
benchmark that was cut off resumes with its remaining runs.

    python benchmarks/quantization_training.py [--part all|qat|binary] [--fp32-epochs 30] [--qat-epochs 5]
        [--binary-epochs 30] [--binary-init-epochs K] [--binary-shortcuts [--binary-react]] [--binary-distill]
        [--binary-wa-only] [--binary-weight-decay WD] [--amp] [--compile]
        [--threads N] [--no-record]
    python benchmarks/quantization_training.py --smoke    # tiny synthetic data, seconds, nothing recorded

Runs go to --work (default /tmp/convforge-bench-runs/quantization-training/DATE); results are appended to
benchmarks/RESULTS.md through common.record.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import extracted, record  # noqa: E402

WORK = Path("/tmp/convforge-bench-runs/quantization-training")
SMOKE_DATA = "synthetic:classes=4,size=16,train=128,test=64"


def _fit(out: Path, **options: Any) -> dict[str, Any]:
    """Train one run into ``out``, or reuse the run already completed there with the same options (so that a
    benchmark cut off after some of its runs resumes with the rest)."""
    from convforge import TrainConfig, fit

    finished = _finished_run(out, options)
    if finished is not None:
        print(f"reusing the completed run {out} (same options)", flush=True)
        return finished
    started = time.perf_counter()
    summary = fit(TrainConfig(out=str(out), **options), quiet=False)
    summary["bench_wall_s"] = time.perf_counter() - started
    return summary


def _finished_run(out: Path, options: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of the completed run in ``out`` when its config.yaml has ``options``, else None."""
    from convforge.config import load_yaml

    if not (out / "summary.json").is_file() or not (out / "config.yaml").is_file():
        return None
    summary = json.loads((out / "summary.json").read_text())
    if summary.get("status") != "completed":
        return None
    saved = load_yaml(out / "config.yaml")
    for name, value in options.items():
        same = (Path(saved.get(name) or "").resolve() == Path(value).resolve() if name == "init"
                else saved.get(name) == value)
        if value is not None and not same:
            return None
    return summary


def _common(args: argparse.Namespace) -> dict[str, Any]:
    return {"data": args.data, "batch_size": args.batch_size, "threads": args.threads, "seed": args.seed,
            "channels_last": args.channels_last, "amp": args.amp, "compile": args.compile}


def _ptq_top1(run: Path, data: Any, threads: int | None, samples: int) -> float:
    """Per-channel min-max int8 of the fp32 checkpoint (ONNX Runtime's static QDQ) on the test split."""
    import torch

    from convforge.data import normalize
    from convforge.export import onnx_top1, quantize_int8
    from convforge.train.inference import load_model

    parent = load_model(run)
    pick = torch.randperm(len(data.train.labels), generator=torch.Generator().manual_seed(0))[:samples]
    calibration = normalize(data.train.images[pick], parent.mean, parent.std)
    report = quantize_int8(parent.model, run / "ptq-int8.onnx", parent.input_size, calibration)
    test = normalize(data.test.images, parent.mean, parent.std)
    return onnx_top1(report["onnx"], test, torch.as_tensor(data.test.labels), threads=threads)


def qat_study(args: argparse.Namespace, work: Path, data: Any) -> dict[str, Any]:
    """fp32 training, PTQ for reference, QAT from the fp32 checkpoint, QDQ export, accuracy and speed."""
    from convforge.export.qat import quantize_trained
    from convforge.train.inference import load_model

    fp32 = _fit(work / "fp32", model=args.qat_model, epochs=args.fp32_epochs, lr=args.lr,
                label_smoothing=args.label_smoothing, **_common(args))
    ptq = _ptq_top1(work / "fp32", data, args.threads, args.calib_samples)
    qat = _fit(work / "qat", init=str(work / "fp32"), qat="int8", epochs=args.qat_epochs, lr=args.qat_lr,
               schedule="cosine", warmup_epochs=0, label_smoothing=args.label_smoothing, **_common(args))
    loaded = load_model(work / "qat")
    report = quantize_trained(loaded, loaded.input_size, work / "qat" / "qat-int8.onnx", data,
                              batch_size=256, threads=args.threads)
    return {"fp32": fp32, "ptq_top1": ptq, "qat": qat, "export": report}


def binary_study(args: argparse.Namespace, work: Path, data: Any) -> dict[str, Any]:
    """The fp32 twin and the two binary variants with one epoch budget; the binary-activation model exported.

    With ``--binary-init-epochs K`` each binary network is trained in two steps (ReActNet, Liu et al. 2020;
    Liu et al. 2021, "How do Adam and training strategies help BNNs optimization"): K epochs with real
    weights (binary weights: a fp32 run; weights+activations: binary activations, ``--binary activations``),
    then the remaining epochs from that checkpoint (``--init``) with binary weights too.
    """
    from convforge.export.qat import quantize_trained
    from convforge.train.inference import load_model

    recipe = {"model": args.binary_model, "optimizer": "adamw", "lr": args.binary_lr, "schedule": "cosine",
              "label_smoothing": args.label_smoothing, **_common(args)}
    real_values = {"binary_shortcuts": args.binary_shortcuts, "binary_ste": args.binary_ste,
                   "binary_react": args.binary_react}
    binary_decay = {} if args.binary_weight_decay is None else {"weight_decay": args.binary_weight_decay}
    runs, teacher = {}, {}
    if args.binary_distill:  # the twin first: the weights+activations network learns its soft targets
        runs["fp32"] = _fit(work / "fp32", epochs=args.binary_epochs, **recipe)
        teacher = {"teachers": [str(Path(runs["fp32"]["run_dir"]) / "last.safetensors")]}  # last: no test pick
    plan = (("binary weights+activations", {"binary": "weights+activations", **real_values, **teacher, **binary_decay},
             {"binary": "activations", **real_values, **teacher, **binary_decay}),
            ("binary weights", {"binary": "weights", **binary_decay}, {}))[:1 if args.binary_wa_only else 2]
    step = args.binary_init_epochs
    for name, extra, first_step in plan:
        if step:
            kind = first_step.get("binary", "fp32")
            first = f"{kind} stage (epochs 1-{step})"
            runs[first] = _fit(work / f"{kind}-stage-{step}", epochs=step, **first_step, **recipe)
            extra = {**extra, "init": str(Path(runs[first]["run_dir"]) / "last.safetensors")}  # last: no test pick
        runs[name] = _fit(work / name.replace(" ", "-").replace("+", "-"), epochs=args.binary_epochs - step,
                          **extra, **recipe)
    if "fp32" not in runs:
        runs["fp32"] = _fit(work / "fp32", epochs=args.binary_epochs, **recipe)
    loaded = load_model(Path(runs["binary weights+activations"]["run_dir"]))
    export = quantize_trained(loaded, loaded.input_size, Path(runs["binary weights+activations"]["run_dir"]) /
                              "binary.onnx", data, batch_size=256, threads=args.threads)
    return {"runs": runs, "export": export}


def qat_lines(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    fp32, qat, export = result["fp32"], result["qat"], result["export"]
    speed = export["images_per_s_batch256"]
    base = speed["torch eager fp32"]
    lines = [f"{args.qat_model} on {args.data}: fp32 {args.fp32_epochs} epochs, then QAT int8 {args.qat_epochs} epochs "
             f"(cosine from lr {args.qat_lr:g}, BatchNorm frozen after half); {export['eval']['images']} test images.",
             "", "| model | top-1 | vs fp32 |", "|---|---:|---:|",
             f"| fp32 (PyTorch) | {fp32['test_top1']:.2f}% | - |"]
    for name, value in (("PTQ int8, per-channel min-max (ONNX Runtime)", result["ptq_top1"]),
                        ("QAT int8, fake-quantized (PyTorch)", export["top1_torch"]),
                        ("QAT int8, QDQ (ONNX Runtime)", export["top1_int8"])):
        lines.append(f"| {name} | {value:.2f}% | {value - fp32['test_top1']:+.2f} |")
    lines += ["", f"Parity on random inputs: max |logit diff| {export['max_abs_diff']:.3g}, top-1 agreement "
                  f"{100 * export['top1_agreement']:.1f}%; size {export['bytes'] / 1e6:.2f} MB int8 vs "
                  f"{export['fp32_bytes'] / 1e6:.2f} MB fp32.", "",
              "| backend (batch 256) | images/s | vs PyTorch eager fp32 |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:.0f} | {value / base:.2f}x |" for name, value in speed.items()]
    lines += ["", f"QAT training: {qat['train_time_s']:.0f} s; fp32 training: {fp32['train_time_s']:.0f} s."]
    return lines


def binary_lines(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    runs, export = result["runs"], result["export"]
    twin, stage_epochs = runs["fp32"]["test_top1"], args.binary_init_epochs
    budget = (f"{args.binary_epochs} epochs each" if not stage_epochs else
              f"{args.binary_epochs} epochs each: each binary network as {stage_epochs} epochs with real weights "
              f"(weights+activations: binary activations; weights: fp32), then {args.binary_epochs - stage_epochs} "
              f"binary epochs from that checkpoint (--init); the twin as {args.binary_epochs} fp32 epochs")
    lines = [f"{args.binary_model} on {args.data}, {budget}; AdamW (lr {args.binary_lr:g}), cosine in every run; "
             "first and last layer full precision; xnor weights (mean |W| per output channel)"
             + ("; weights+activations with Bi-Real shortcuts (a real-valued shortcut around every binary "
                "convolution, no other activation)" if args.binary_shortcuts else "")
             + ("; ReActNet's activations (learnable sign thresholds, RPReLU; --binary-react)"
                if args.binary_react else "")
             + ("; the weights+activations network also learns the fp32 twin's soft targets (--teacher: the "
                "twin's last checkpoint, kd alpha 0.5, temperature 4)" if args.binary_distill else "")
             + (f"; weight decay {args.binary_weight_decay:g} in the binary runs (the twin: train's default)"
                if args.binary_weight_decay is not None else "")
             + ("; the sign's straight-through gradient scaled to each channel's standard deviation "
                "(--binary-ste scaled)." if args.binary_ste == "scaled" else ".")
             + "".join(f" {flag} in every run." for flag, on in (("bf16 autocast (--amp)", args.amp),
                                                                    ("torch.compile (--compile)", args.compile)) if on),
             "", "| network | top-1 | vs fp32 twin | training time |", "|---|---:|---:|---:|"]
    for name, summary in runs.items():
        gap = "-" if "stage" in name or name == "fp32" else f"{summary['test_top1'] - twin:+.2f}"
        lines.append(f"| {name} | {summary['test_top1']:.2f}% | {gap} | {summary['train_time_s']:.0f} s |")
    if stage_epochs:
        lines += ["", "Each binary network's training time above excludes the stage it started from."]
    lines += ["", f"The binary weights+activations model in ONNX Runtime (float graph, binarised weights): "
                  f"{export['top1_onnx']:.2f}% (PyTorch {export['top1_torch']:.2f}%), max |logit diff| "
                  f"{export['max_abs_diff']:.2g} on random inputs; no bit-packed kernels, so no speed-up is claimed."]
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "qat", "binary"), default="all")
    parser.add_argument("--data", help="data spec (default: CIFAR-10-JPEG from ../shared; --smoke: synthetic)")
    parser.add_argument("--qat-model", default="mobilenet_v2_cifar")
    parser.add_argument("--binary-model", default="resnet20")
    parser.add_argument("--fp32-epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=5)
    parser.add_argument("--binary-epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1, help="fp32 training peak lr (SGD, onecycle)")
    parser.add_argument("--qat-lr", type=float, default=0.005, help="QAT peak lr (SGD, cosine, no warm-up)")
    parser.add_argument("--binary-lr", type=float, default=2e-3, help="peak lr of the three binary-study runs (AdamW)")
    parser.add_argument("--binary-init-epochs", type=int, default=0,
                        help="two-step binary training: this many of --binary-epochs with real weights (binary "
                             "activations for weights+activations), the rest with binary weights too")
    parser.add_argument("--binary-ste", choices=("clipped", "scaled"),
                        help="the binary activations' straight-through gradient (default: train's, clipped)")
    parser.add_argument("--binary-shortcuts", action="store_true",
                        help="Bi-Real shortcuts in the weights+activations run (train's --binary-shortcuts)")
    parser.add_argument("--binary-react", action="store_true",
                        help="with --binary-shortcuts: ReActNet's activations (train's --binary-react)")
    parser.add_argument("--binary-distill", action="store_true",
                        help="the weights+activations network distils from the fp32 twin (trained first)")
    parser.add_argument("--binary-weight-decay", type=float,
                        help="AdamW weight decay of the binary runs only (default: train's, as for the twin); "
                             "decay pulls latent weights towards 0, where their signs flip most (Liu et al. 2021)")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=512, help="PTQ calibration images")
    parser.add_argument("--binary-wa-only", action="store_true",
                        help="train only the weights+activations network (and its twin), not binary weights")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast in every run (train's --amp)")
    parser.add_argument("--compile", action="store_true", help="torch.compile in every run (train's --compile)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help=f"run directory (default: {WORK}/DATE-TIME)")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic data and 1 epoch per run; no record")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data = args.data or SMOKE_DATA
        args.fp32_epochs = args.qat_epochs = args.binary_epochs = 1
        args.batch_size, args.calib_samples, args.no_record = 32, 64, True
        if args.qat_model == "mobilenet_v2_cifar":
            args.qat_model = "smallcnn"
        if args.binary_init_epochs:
            args.binary_init_epochs, args.binary_epochs = 1, 2
    if args.binary_react and not args.binary_shortcuts:
        parser.error("--binary-react's RPReLU sits on the real-valued path: add --binary-shortcuts")
    if not 0 <= args.binary_init_epochs < args.binary_epochs:
        parser.error(f"--binary-init-epochs must be >= 0 and below --binary-epochs ({args.binary_epochs}), "
                     f"got {args.binary_init_epochs}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.data is None:
        args.data = f"imagefolder:{extracted('cifar10-jpeg.tar.gz', 'cifar10-jpeg')}"
    from convforge.train.inference import load_data

    data = load_data(args.data)  # also warms the decoding cache before any clock starts
    work = args.work or WORK / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    command = " ".join(["python benchmarks/quantization_training.py", *(argv if argv is not None else sys.argv[1:])])
    if args.part in ("all", "qat"):
        result["qat"] = qat_study(args, work / "qat", data)
        record(f"Quantization-aware training: {args.qat_model} int8 (QAT vs PTQ, ONNX Runtime)",
               qat_lines(result["qat"], args) + ["", f"Command: `{command}`"],
               save=not args.no_record)
    if args.part in ("all", "binary"):
        result["binary"] = binary_study(args, work / "binary", data)
        record(f"Binary networks: {args.binary_model} (XNOR weights, sign activations) vs its fp32 twin",
               binary_lines(result["binary"], args) + ["", f"Command: `{command}`"], save=not args.no_record)
    (work / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
