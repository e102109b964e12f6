"""``convforge bench``, ``export``, ``quantize`` and ``prune``: measuring, deploying and compressing a model."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from convforge.cli.common import (
    Command,
    add_model_source,
    add_runtime,
    image_pair,
    load_source,
    print_table,
    runtime_device,
)
from convforge.errors import ConfigError


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return sizes


def _input_size(text: str) -> tuple[int, int, int]:
    from convforge.measure.bench import parse_input

    return parse_input(text)


def _model_input(args: argparse.Namespace, device: str = "cpu", **overrides: Any):
    """The LoadedModel and its (C, H, W) input: --input CxHxW (old spelling), else --image-size, else its own."""
    size = getattr(args, "input", None)
    if size is not None:
        if args.in_chans is None:
            overrides["in_chans"] = size[0]
        overrides["image_size"] = size[1:]
    loaded = load_source(args, device, **overrides)
    if size is None:
        pair = image_pair(getattr(args, "image_size", None))
        size = (loaded.input_size[0], *pair) if pair else loaded.input_size
    return loaded, tuple(size)


def _calibration_images(spec: str, loaded: Any, samples: int, input_size: tuple[int, ...]):
    """``samples`` normalised images from the train split (or the first split) of ``spec``, seeded subset:
    for a model trained on image stores, their evaluation views (the checkpoint's resize + centre crop)."""
    import torch

    from convforge.data import normalize
    from convforge.data.dataset import convert_channels
    from convforge.train.inference import eval_views, normalization_for, view_images

    if samples < 1:
        raise ConfigError(f"--calib-samples must be >= 1, got {samples}")
    data = _deploy_data(spec, loaded, input_size)
    split = "train" if data.train is not None else next(s for s in ("val", "test") if getattr(data, s, None))
    if getattr(data, "is_shards", False):  # streamed shards: the first images (write_shards shuffles them)
        images = torch.cat([batch for batch, _ in eval_views(loaded, data, split, limit=samples)])
    else:
        pick = torch.randperm(len(data.split(split).labels), generator=torch.Generator().manual_seed(0))[:samples]
        images = view_images(data, split, pick)
    images = convert_channels(images, input_size[0])
    mean, std = normalization_for(loaded, data, [])
    return normalize(images, mean, std), data


def _deploy_data(spec: str, loaded: Any, input_size: tuple[int, ...], sized: bool = True) -> Any:
    """``spec`` loaded for calibrating or evaluating ``loaded``: a store-trained model's image folders as image
    stores viewed as its checkpoint's ``preprocess`` records (at ``input_size``), other data at ``input_size``
    when square and ``sized`` (else at its own size)."""
    from convforge.train.inference import load_data, load_eval_data

    if loaded.meta.get("preprocess"):
        return load_eval_data(loaded, spec, input_size[1:])
    return load_data(spec, image_size=input_size[1] if sized and input_size[1] == input_size[2] else None)


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from convforge.export.bench import BACKENDS

    add_model_source(parser)
    parser.add_argument("--input", type=_input_size, help=argparse.SUPPRESS)  # old spelling: CxHxW
    parser.add_argument("--backend", default="torch,onnxruntime",
                        help=f"comma-separated backends from {','.join(BACKENDS)} (default: torch,onnxruntime)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default: 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per batch size (default: 10)")
    parser.add_argument("--calib-data", help="data spec to calibrate onnxruntime-int8 (default: random inputs, "
                                             "speed only)")
    add_runtime(parser, batch_size="1,32,256", batch_type=_batch_sizes, tta=False,
                batch_help="comma-separated batch sizes")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge bench``: params, MACs, latency and throughput per backend and batch size."""
    from convforge.export import benchmark
    from convforge.export.bench import BACKENDS
    from convforge.measure.bench import parse_list
    from convforge.progress import echo

    runtime_device(args)
    loaded, size = _model_input(args)
    batches = args.batch_size if isinstance(args.batch_size, list) else _batch_sizes(args.batch_size)
    backends = parse_list(args.backend, "--backend", BACKENDS)
    if args.warmup < 0 or args.repeats < 1:
        raise ConfigError("--warmup must be >= 0 and --repeats >= 1")
    calibration = None
    if args.calib_data and "onnxruntime-int8" in backends:
        calibration, _ = _calibration_images(args.calib_data, loaded, 256, size)
    result = benchmark(loaded.model, size, batches, backends, threads=args.threads, warmup=args.warmup,
                       repeats=args.repeats, calibration=calibration, log=echo)
    result["target"] = loaded.label
    if not args.json:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{loaded.label}: {result['params'] / 1e6:.3f} M params, {result['macs'] / 1e6:.1f} M "
                            f"MACs, input {'x'.join(map(str, size))}, {result['threads']} threads")
        for column in ("backend", "batch", "p50 ms", "p90 ms", "images/s"):
            table.add_column(column, justify="left" if column == "backend" else "right")
        for r in result["rows"]:
            table.add_row(r["backend"], str(r["batch"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                          f"{r['images_per_s']:.0f}")
        Console(soft_wrap=True).print(table)
        for note in result["notes"]:
            print(f"note: {note}")
    return result


def _default_out(loaded: Any, suffix: str) -> Path:
    """Next to the checkpoint, or NAME+suffix in the current folder for a registry model or foreign weights."""
    if loaded.path is not None:
        return loaded.path.with_name(loaded.path.stem + suffix)
    stem = Path(loaded.weights).stem if loaded.weights else loaded.name
    return Path(stem + suffix)


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source(parser)
    parser.add_argument("--format", default="onnx", choices=("onnx",), help="export format (default: onnx)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    parser.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    parser.add_argument("--out", help="output .onnx path (default: next to the checkpoint)")
    add_runtime(parser, batch_size=1, tta=False, batch_help="batch size of the exported example input")


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge export``: ONNX (plus a JSON sidecar), checked against PyTorch."""
    from convforge.export import to_onnx

    runtime_device(args)  # export and the parity check run on the CPU
    loaded, size = _model_input(args)
    if (loaded.meta.get("quantization") or {}).get("kind") == "qat":
        raise ConfigError(f"{loaded.label} is a quantization-aware (--qat) checkpoint: export it as int8 QDQ with "
                          "`convforge quantize CKPT` (no calibration needed; ONNX Runtime's int8 arithmetic may "
                          "differ from PyTorch's by one quantization step, beyond this command's 1e-4 parity check)")
    out = Path(args.out) if args.out else _default_out(loaded, ".onnx")
    report = to_onnx(loaded.model, out, size, opset=args.opset, dynamic_batch=args.dynamic_batch,
                     batch_size=args.batch_size, meta=dict(loaded.meta))
    report["checkpoint"] = loaded.label
    if not args.json:
        print(f"wrote {report['onnx']} (opset {report['opset']}, {'dynamic' if report['dynamic_batch'] else 'fixed'} "
              f"batch, {report['bytes'] / 1e6:.2f} MB) and {Path(report['onnx']).with_suffix('.json')}")
        print(f"ONNX Runtime vs PyTorch: max absolute logit difference {report['max_abs_diff']:.3g} (limit 1e-4)")
    return report


def _add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    from convforge.compress.quantization.calibration import METHODS

    add_model_source(parser)
    parser.add_argument("--calib-data", help="data spec whose train split calibrates the activation ranges (required), "
                                             "or zeroq: data-free, images distilled from the model's BatchNorm "
                                             "statistics (ZeroQ; --data then names the images to score on)")
    parser.add_argument("--calib-samples", type=int,
                        help=f"calibration images (default: 512; {ZEROQ_SAMPLES} with --calib-data zeroq)")
    parser.add_argument("--calib-method", default="minmax", choices=METHODS,
                        help="activation ranges: min-max, percentile of |x|, entropy (KL, TensorRT's 2048 bins) or the "
                             "clip with the least mean squared quantization error (default: minmax)")
    parser.add_argument("--calib-percentile", type=float,
                        help="percentile for --calib-method percentile (default: 99.999)")
    parser.add_argument("--per-tensor", action="store_true",
                        help="one int8 scale per weight tensor (default: one per output channel)")
    parser.add_argument("--symmetric", action="store_true",
                        help="int8 activations with zero point 0 (default: uint8 asymmetric, the fast x86 path)")
    parser.add_argument("--equalize", action="store_true",
                        help="cross-layer equalization of consecutive convolutions before quantizing (Nagel et al. "
                             "2019; ReLU6 between them becomes ReLU)")
    parser.add_argument("--bias-correction", action="store_true",
                        help="subtract the mean output shift of int8 weights from each bias (calibration images)")
    parser.add_argument("--sensitivity", action="store_true",
                        help="rank the layers by the output error of quantizing each alone (table and JSON)")
    parser.add_argument("--max-drop", type=float, metavar="P",
                        help="keep the fewest most sensitive layers in float until int8 top-1 is within P points of "
                             "fp32 on the evaluation split (implies --sensitivity)")
    parser.add_argument("--weight-bits", type=int, default=8, choices=(8, 4),
                        help="4: per-channel 4-bit weights (first conv and classifier 8-bit), uint8 activations, "
                             "int4 QDQ; storage only, no speed-up (default: 8)")
    parser.add_argument("--rounding", default="adaround", choices=("adaround", "nearest"),
                        help="with --weight-bits 4: AdaRound layer-wise reconstruction or round-to-nearest "
                             "(default: adaround)")
    parser.add_argument("--adaround-iterations", type=int,
                        help="with --weight-bits 4: AdaRound optimisation steps per layer (default: 1000)")
    parser.add_argument("--data", help="data spec to evaluate on (default: --calib-data)")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"),
                        help="evaluation split (default: test)")
    parser.add_argument("--eval-samples", type=int, help="evaluate on the first N images only (default: all)")
    parser.add_argument("--out", help="output .onnx path (default: next to the checkpoint, *-int8.onnx)")
    add_runtime(parser, tta=False, batch_help="evaluation batch size")


def _ptq_options(args: argparse.Namespace):
    from convforge.compress.quantization import CalibrationSettings, PTQOptions

    if args.calib_percentile is not None and args.calib_method != "percentile":
        raise ConfigError(f"--calib-percentile applies to --calib-method percentile only (got --calib-method "
                          f"{args.calib_method}); drop it or add --calib-method percentile")
    settings = CalibrationSettings(args.calib_method, symmetric=args.symmetric,
                                   **({"percentile": args.calib_percentile} if args.calib_percentile else {}))
    return PTQOptions(calibration=settings, per_channel=not args.per_tensor, equalize=args.equalize,
                      bias_correction=args.bias_correction)


def _foreign_classes(args: argparse.Namespace) -> dict[str, Any]:
    """A registry model or foreign weights takes the class names (and count) of the data it is scored on."""
    from convforge.train.inference import classes_for, is_checkpoint_path, load_data

    if args.source and is_checkpoint_path(args.source) and not (args.model or args.weights):
        return {}
    data = load_data(args.data or args.calib_data)
    return {"num_classes": args.num_classes or data.num_classes, "classes": classes_for(data, args.num_classes)}


ZEROQ_SAMPLES = 32


def _zeroq_images(args: argparse.Namespace, loaded: Any, size: tuple[int, ...]):
    """--calib-data zeroq: calibration images distilled from the model's BatchNorm statistics (no data needed)."""
    from convforge.compress.quantization.zeroq import distill_calibration_images

    if args.calib_samples is not None and args.calib_samples < 1:
        raise ConfigError(f"--calib-samples must be >= 1, got {args.calib_samples}")
    return distill_calibration_images(loaded.model, args.calib_samples or ZEROQ_SAMPLES, size, seed=0)


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge quantize``: static int8 with ONNX Runtime; fp32 vs int8 top-1 and speed."""
    from convforge.compress.quantization.command import quantize_loaded, report_tables
    from convforge.progress import echo

    if _trained_quantized(args):  # a --qat / --binary checkpoint: its own ranges and weights, no calibration
        return _export_trained_quantized(args)
    if not args.calib_data:
        raise ConfigError("static int8 quantization needs calibration data: pass --calib-data SPEC (e.g. "
                          "cifar10:DIR or imagefolder:DIR); its images set the activation ranges")
    if args.calib_data == "zeroq" and not args.data:
        raise ConfigError("--calib-data zeroq calibrates without data, but the int8 model is scored on images: pass "
                          "--data SPEC (the data to evaluate on)")
    _check_w4_options(args)
    options = _ptq_options(args)
    runtime_device(args)  # ONNX Runtime runs on the CPU
    loaded, size = _model_input(args, **_foreign_classes(args))
    if args.calib_data == "zeroq":
        calibration, calib_data = _zeroq_images(args, loaded, size), None
    else:
        samples = 512 if args.calib_samples is None else args.calib_samples
        calibration, calib_data = _calibration_images(args.calib_data, loaded, samples, size)
    out = Path(args.out) if args.out else _default_out(loaded, "-w4a8.onnx" if args.weight_bits == 4 else "-int8.onnx")
    data = _deploy_data(args.data, loaded, size, sized=False) if args.data and args.data != args.calib_data \
        else calib_data
    if args.weight_bits == 4:
        return _quantize_w4(args, loaded, size, calibration, data, out)
    report = quantize_loaded(loaded, size, calibration, data, out, options, split=args.split,
                             eval_samples=args.eval_samples, batch_size=args.batch_size, threads=args.threads,
                             sensitivity=args.sensitivity, max_drop=args.max_drop, log=echo)
    if not args.json:
        for title, rows in report_tables(report, args.calib_data):
            print_table(title, rows)
        for note in report["notes"]:
            print(f"note: {note}")
    return report


def _check_w4_options(args: argparse.Namespace) -> None:
    """--weight-bits 4 has its own weight grid: the int8 PTQ options do not apply to it."""
    int8_only = [flag for flag, value in (("--per-tensor", args.per_tensor), ("--equalize", args.equalize),
                                          ("--bias-correction", args.bias_correction),
                                          ("--sensitivity", args.sensitivity), ("--max-drop", args.max_drop),
                                          ("--calib-method", args.calib_method != "minmax")) if value]
    if args.weight_bits == 4 and int8_only:
        raise ConfigError(f"{', '.join(int8_only)}: int8 options; --weight-bits 4 uses per-channel 4-bit weights "
                          "with min-max uint8 activations: drop them")
    if args.weight_bits != 4 and (args.adaround_iterations is not None or args.rounding != "adaround"):
        raise ConfigError("--rounding and --adaround-iterations apply to --weight-bits 4 only")
    if args.adaround_iterations is not None and args.adaround_iterations < 1:
        raise ConfigError(f"--adaround-iterations must be >= 1, got {args.adaround_iterations}")


def _quantize_w4(args: argparse.Namespace, loaded: Any, size: tuple[int, ...], calibration: Any, data: Any,
                 out: Path) -> dict[str, Any]:
    from convforge.compress.quantization.command import quantize_weights_4bit, w4_rows

    report = quantize_weights_4bit(loaded, size, calibration, data, out, rounding=args.rounding,
                                   iterations=args.adaround_iterations, split=args.split,
                                   eval_samples=args.eval_samples, batch_size=args.batch_size, threads=args.threads)
    if not args.json:
        print_table("4-bit weights (W4A8, ONNX Runtime int4 QDQ)", w4_rows(report))
    return report


def _trained_quantized(args: argparse.Namespace) -> bool:
    """The model source is a checkpoint of a --qat or --binary run."""
    from convforge.export.qat import is_trained_quantized
    from convforge.train.checkpoint import read_checkpoint_meta
    from convforge.train.inference import is_checkpoint_path

    return (bool(args.source) and not args.model and not args.weights and is_checkpoint_path(args.source)
            and is_trained_quantized(read_checkpoint_meta(args.source)))


def _export_trained_quantized(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge quantize`` of a --qat / --binary checkpoint: export it (QDQ int8 / binarised float) and
    evaluate on --data, --calib-data or its own data."""
    from convforge.export.qat import quantize_trained, report_rows

    runtime_device(args)
    loaded, size = _model_input(args)
    spec = args.data or args.calib_data or loaded.meta.get("data", {}).get("spec")
    data = _deploy_data(spec, loaded, size, sized=False) if spec else None
    suffix = "-binary.onnx" if loaded.meta["quantization"].get("kind") == "binary" else "-int8.onnx"
    out = Path(args.out) if args.out else _default_out(loaded, suffix)
    report = quantize_trained(loaded, size, out, data, split=args.split, eval_samples=args.eval_samples,
                              batch_size=args.batch_size, threads=args.threads)
    if not args.json:
        print_table(f"trained {report['kind']} checkpoint exported (ONNX Runtime)", report_rows(report))
        for note in report["notes"]:
            print(f"note: {note}")
    return report


def _add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    from convforge.compress.pruning import METHODS

    add_model_source(parser)
    parser.add_argument("--method", required=True, choices=METHODS, help="pruning criterion")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-macs", type=float, help="fraction of the MACs to keep, e.g. 0.5 (structured methods)")
    target.add_argument("--sparsity", type=float, help="share removed: of the channels of every group (structured) "
                                                       "or of all weights (global-magnitude)")
    parser.add_argument("--min-share", type=float, help="least share kept of every channel group / layer "
                                                        "(default: 0.1 structured, 0.02 global-magnitude)")
    parser.add_argument("--round-to", type=int, default=1,
                        help="keep a multiple of N channels per group (8 suits vectorised CPU kernels; default: 1)")
    parser.add_argument("--global-pruning", action="store_true",
                        help="rank the channels of all groups together, so groups lose different shares (default: the "
                             "same share of every group)")
    parser.add_argument("--normalizer", choices=("mean", "max"), default="mean",
                        help="group-l2/taylor: divide a group's scores by their mean or max (default: mean)")
    parser.add_argument("--sparsity-epochs", type=int, default=0,
                        help="train this many epochs with the group regulariser before pruning (default: 0)")
    parser.add_argument("--sparsity-reg", type=float, default=5e-4,
                        help="group regulariser strength (default: 5e-4)")
    parser.add_argument("--finetune-epochs", type=float, default=0, help="fine-tuning epochs after pruning (default: 0)")
    parser.add_argument("--data", help="data spec for fine-tuning and evaluation (default: the checkpoint's own data)")
    parser.add_argument("--steps", type=int, default=1, help="prune then fine-tune in K steps (default: 1)")
    parser.add_argument("--distill", nargs="?", const=True, default=False, metavar="TEACHER",
                        help="fine-tune on the soft targets of the unpruned model, or of the TEACHER checkpoint, too "
                             "(knowledge distillation, the "
                             "weight and temperature of train's --kd-alpha/--kd-temperature defaults)")
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tuning peak learning rate, cosine schedule "
                                                              "(default: 0.01)")
    parser.add_argument("--amp", action="store_true", help="fine-tune with bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="fine-tune in channels_last memory format")
    parser.add_argument("--out", help="output checkpoint (default: CKPT-pruned-METHOD.safetensors next to CKPT)")
    parser.add_argument("--dry-run", action="store_true", help="print the per-layer plan (old/new widths, MACs); "
                                                               "change nothing")
    parser.add_argument("--seed", type=int, default=0, help="seed (random method, fine-tuning order)")
    add_runtime(parser, batch_size=128, tta=False, batch_help="fine-tuning batch size")


def run_prune(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge prune``: :func:`convforge.compress.pipeline.prune_checkpoint` on any model source."""
    import inspect

    from convforge.compress.pipeline import prune_checkpoint
    from convforge.train.inference import is_checkpoint_path

    device = runtime_device(args)
    options = {"target_macs": args.target_macs, "sparsity": args.sparsity, "min_share": args.min_share,
               "round_to": args.round_to, "global_ranking": args.global_pruning, "normalizer": args.normalizer,
               "sparsity_epochs": args.sparsity_epochs, "sparsity_reg": args.sparsity_reg,
               "finetune_epochs": args.finetune_epochs, "data": args.data,
               "steps": args.steps, "distill": args.distill, "lr": args.lr, "batch_size": args.batch_size,
               "out": args.out,
               "dry_run": args.dry_run, "seed": args.seed, "amp": args.amp, "channels_last": args.channels_last,
               "image_size": args.image_size, "device": device, "threads": args.threads}
    accepted = inspect.signature(prune_checkpoint).parameters
    options = {k: v for k, v in options.items() if k in accepted and (v is not None or k in ("target_macs",
                                                                                               "sparsity"))}
    with tempfile.TemporaryDirectory(prefix="convforge-prune-") as tmp:
        checkpoint = args.source
        if args.model or args.weights or not (args.source and is_checkpoint_path(args.source)):
            checkpoint = _as_checkpoint(args, Path(tmp))
            stem = Path(args.weights).stem if args.weights else args.model or args.source
            options["out"] = options.get("out") or f"{stem}-pruned-{args.method}.safetensors"
        report = prune_checkpoint(checkpoint, args.method, **options)
    if not args.json:
        _print_prune(report)
    return report


def _as_checkpoint(args: argparse.Namespace, folder: Path) -> Path:
    """A registry model or foreign weights written as a temporary checkpoint (what `convforge import` writes)."""
    from convforge.train.inference import load_data, save_loaded

    data = load_data(args.data) if args.data else None
    overrides = {"num_classes": args.num_classes or data.num_classes, "classes": list(data.classes)} if data else {}
    loaded = load_source(args, **overrides)
    return save_loaded(loaded, folder / "source.safetensors", data)


def _print_prune(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    plan = report["plan"]
    if report["method"] == "global-magnitude":
        table = Table(title="global magnitude pruning: per-layer sparsity")
        for column in ("layer", "weights", "kept", "sparsity"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for row in plan:
            table.add_row(row["layer"], f"{row['weights']:,}", f"{row['kept']:,}", f"{100 * row['sparsity']:.1f}%")
    else:
        table = Table(title=f"{report['method']} plan: layer widths and MACs")
        for column in ("layer", "kind", "in", "out", "MACs"):
            table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
        for row in plan:
            fmt = (lambda pair: "-" if pair[0] is None else (f"{pair[0]}" if pair[0] == pair[1] else f"{pair[0]} -> {pair[1]}"))
            table.add_row(row["layer"], row["kind"], fmt(row["in"]), fmt(row["out"]),
                          f"{row['macs'][0] / 1e6:.2f} -> {row['macs'][1] / 1e6:.2f} M")
    console.print(table)
    console.print(f"MACs {report['macs_before'] / 1e6:.2f} M -> {report['macs_after'] / 1e6:.2f} M "
                  f"({100 * report['macs_after'] / report['macs_before']:.1f}%), params {report['params_before']:,} -> "
                  f"{report['params_after']:,}", markup=False)
    for note in report.get("notes", []):
        console.print(f"note: {note}", markup=False)
    if report.get("dry_run"):
        console.print("dry run: no weights were changed and nothing was written", markup=False)
        return
    if "top1_before" in report:
        console.print(f"top-1 {report['top1_before']:.2f}% -> {report.get('top1_after', float('nan')):.2f}%", markup=False)
    console.print(f"wrote {report['output']}", markup=False)


COMMANDS = [
    Command("bench", "params, MACs, latency and throughput per backend and batch size", _add_bench_arguments,
            run_bench, "Measure a model on this machine: params, MACs (torch.utils.flop_counter), latency p50/p90 "
                       "over repeats after warm-up, and throughput, for each backend and batch size."),
    Command("export", "export a model to ONNX, checked against PyTorch", _add_export_arguments, run_export,
            "Write the model as ONNX (plus a JSON sidecar) and check ONNX Runtime against PyTorch: the largest "
            "absolute logit difference must be <= 1e-4 (exit code 5 otherwise)."),
    Command("quantize", "static int8 with ONNX Runtime (QDQ; calibration methods, mixed precision)",
            _add_quantize_arguments, run_quantize,
            "BatchNorm folded (optionally cross-layer equalized and bias-corrected), exported to ONNX, quantized "
            "statically to int8 (QDQ, per-channel or per-tensor int8 weights, uint8 or symmetric int8 activations) "
            "with activation ranges calibrated on real images by min-max, percentile, entropy or MSE; optionally "
            "ranks the layers by sensitivity and keeps the fewest in float for a --max-drop target; reports fp32 vs "
            "int8 top-1 and speed on the evaluation split."),
    Command("prune", "structured pruning (real speed-ups) or global magnitude pruning", _add_prune_arguments,
            run_prune, "Structured methods remove filters and channels physically (consistent across residual "
                       "additions, concatenations, depthwise convolutions and the classifier) and save a smaller "
                       "checkpoint; global-magnitude zeroes weights (no dense speed-up)."),
]
