"""The ``convforge`` subcommands for compression and deployment: bench, export, quantize, prune."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from convforge.errors import ConfigError, ConvforgeError


def add_parsers(sub: Any, add_json) -> None:
    from convforge.compress.prune import METHODS
    from convforge.export.bench import BACKENDS

    be = sub.add_parser("bench", help="params, MACs, latency and throughput per backend and batch size",
                        description="Measure a model (registry name) or a checkpoint on this machine: params, MACs "
                                    "(torch.utils.flop_counter), latency p50/p90 over repeats after warm-up, and "
                                    "throughput, for each backend and batch size.")
    be.add_argument("target", metavar="MODEL|CKPT", help="model name from `convforge models`, or a checkpoint")
    be.add_argument("--input", help="input size CxHxW (default: the checkpoint's or the registry's)")
    be.add_argument("--batch", default="1,32,256", help="comma-separated batch sizes (default: 1,32,256)")
    be.add_argument("--backend", default="torch,onnxruntime",
                    help=f"comma-separated backends from {','.join(BACKENDS)} (default: torch,onnxruntime)")
    be.add_argument("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime (default: their choice)")
    be.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default: 3)")
    be.add_argument("--repeats", type=int, default=10, help="timed calls per batch size (default: 10)")
    be.add_argument("--calib-data", help="data spec to calibrate onnxruntime-int8 (default: random inputs, speed only)")
    add_json(be)

    ex = sub.add_parser("export", help="export a checkpoint to ONNX, checked against PyTorch",
                        description="Write CKPT as ONNX (plus a JSON sidecar) and check ONNX Runtime against PyTorch: "
                                    "the largest absolute logit difference must be <= 1e-4 (exit code 5 otherwise).")
    ex.add_argument("checkpoint", metavar="CKPT", help="checkpoint .safetensors, its .json, or a run directory")
    ex.add_argument("--format", default="onnx", choices=("onnx",), help="export format (default: onnx)")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    ex.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    ex.add_argument("--out", help="output .onnx path (default: next to the checkpoint)")
    add_json(ex)

    qu = sub.add_parser("quantize", help="static int8 with ONNX Runtime (QDQ, per-channel weights)",
                        description="BatchNorm folded, exported to ONNX, quantized statically to int8 (QDQ, per-channel "
                                    "int8 weights, uint8 activations) with activation ranges calibrated on real images; "
                                    "reports fp32 vs int8 top-1 and speed on the evaluation split.")
    qu.add_argument("checkpoint", metavar="CKPT", help="checkpoint .safetensors, its .json, or a run directory")
    qu.add_argument("--calib-data", help="data spec whose train split calibrates the activation ranges (required)")
    qu.add_argument("--calib-samples", type=int, default=512, help="calibration images (default: 512)")
    qu.add_argument("--data", help="data spec to evaluate on (default: --calib-data)")
    qu.add_argument("--split", default="test", choices=("test", "val", "train"), help="evaluation split (default: test)")
    qu.add_argument("--eval-samples", type=int, help="evaluate on the first N images only (default: all)")
    qu.add_argument("--threads", type=int, help="CPU threads for the speed measurement")
    qu.add_argument("--out", help="output .onnx path (default: next to the checkpoint, *-int8.onnx)")
    add_json(qu)

    pr = sub.add_parser("prune", help="structured pruning (real speed-ups) or global magnitude pruning",
                        description="Structured methods remove filters and channels physically (consistent across "
                                    "residual additions, concatenations, depthwise convolutions and the classifier) "
                                    "and save a smaller checkpoint; global-magnitude zeroes weights (no dense speed-up).")
    pr.add_argument("checkpoint", metavar="CKPT", help="checkpoint .safetensors, its .json, or a run directory")
    pr.add_argument("--method", required=True, choices=METHODS, help="pruning criterion")
    target = pr.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-macs", type=float, help="fraction of the MACs to keep, e.g. 0.5 (structured methods)")
    target.add_argument("--sparsity", type=float,
                        help="share removed: of the channels of every group (structured) or of all weights (global-magnitude)")
    pr.add_argument("--min-share", type=float,
                    help="least share kept of every channel group / layer (default: 0.1 structured, 0.02 global-magnitude)")
    pr.add_argument("--round-to", type=int, default=1,
                    help="keep a multiple of N channels per group (8 suits vectorised CPU kernels; default: 1)")
    pr.add_argument("--finetune-epochs", type=float, default=0, help="fine-tuning epochs after pruning (default: 0)")
    pr.add_argument("--data", help="data spec for fine-tuning and evaluation (default: the checkpoint's own data)")
    pr.add_argument("--steps", type=int, default=1, help="prune then fine-tune in K steps (default: 1)")
    pr.add_argument("--lr", type=float, default=0.01, help="fine-tuning peak learning rate, cosine schedule (default: 0.01)")
    pr.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch size (default: 128)")
    pr.add_argument("--amp", action="store_true", help="fine-tune with bfloat16 autocast")
    pr.add_argument("--channels-last", action="store_true", help="fine-tune in channels_last memory format")
    pr.add_argument("--out", help="output checkpoint (default: CKPT-pruned-METHOD.safetensors next to CKPT)")
    pr.add_argument("--dry-run", action="store_true", help="print the per-layer plan (old/new widths, MACs); change nothing")
    pr.add_argument("--seed", type=int, default=0, help="seed (random method, fine-tuning order)")
    add_json(pr)


# ---------------------------------------------------------------- helpers


def _load_target(target: str, input_text: str | None):
    """A model and its input size from a checkpoint path or a registry name."""
    from convforge.measure.bench import parse_input
    from convforge.models import create_model, list_models, model_info
    from convforge.train import load_checkpoint

    path = Path(target)
    if path.exists() or target.endswith((".safetensors", ".json")):
        ckpt = load_checkpoint(target)
        size = parse_input(input_text) if input_text else ckpt.input_size
        return ckpt.model, size, ckpt
    if target not in list_models():
        raise ConvforgeError(f"{target!r} is neither a checkpoint file nor a model name; see `convforge models`")
    info = model_info(target)
    size = parse_input(input_text) if input_text else tuple(info.input_size)
    model = create_model(target, in_chans=size[0])
    return model.eval(), size, None


def _calibration_images(spec: str, ckpt, samples: int, input_size):
    """``samples`` normalised images from the train split (or the first split) of ``spec``, seeded subset."""
    import torch

    from convforge.data import normalize
    from convforge.data.dataset import convert_channels
    from convforge.predict import load_data_for

    if samples < 1:
        raise ConfigError(f"--calib-samples must be >= 1, got {samples}")
    data = load_data_for(spec, image_size=input_size[1] if input_size[1] == input_size[2] else None)
    split = data.train if data.train is not None else data.first_split
    images = split.images
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:samples]
    images = convert_channels(images[pick], input_size[0])
    mean = ckpt.mean if ckpt is not None else data.mean
    std = ckpt.std if ckpt is not None else data.std
    return normalize(images, mean, std), data


def _print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    from convforge.cli import _print_table

    _print_table(title, rows)


# ---------------------------------------------------------------- commands


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.export import benchmark
    from convforge.export.bench import BACKENDS
    from convforge.measure.bench import parse_list
    from convforge.progress import echo

    model, size, ckpt = _load_target(args.target, args.input)
    try:
        batches = [int(b) for b in parse_list(args.batch, "--batch")]
    except ValueError:
        raise ConfigError(f"--batch must be comma-separated integers, got {args.batch!r}") from None
    backends = parse_list(args.backend, "--backend", BACKENDS)
    if args.warmup < 0 or args.repeats < 1:
        raise ConfigError("--warmup must be >= 0 and --repeats >= 1")
    calibration = None
    if args.calib_data and "onnxruntime-int8" in backends:
        calibration, _ = _calibration_images(args.calib_data, ckpt, 256, size)
    result = benchmark(model, size, batches, backends, threads=args.threads, warmup=args.warmup,
                       repeats=args.repeats, calibration=calibration, log=echo)
    result["target"] = args.target
    if not args.json:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{args.target}: {result['params'] / 1e6:.3f} M params, {result['macs'] / 1e6:.1f} M MACs, "
                            f"input {'x'.join(map(str, size))}, {result['threads']} threads")
        for column in ("backend", "batch", "p50 ms", "p90 ms", "images/s"):
            table.add_column(column, justify="left" if column == "backend" else "right")
        for r in result["rows"]:
            table.add_row(r["backend"], str(r["batch"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                          f"{r['images_per_s']:.0f}")
        Console(soft_wrap=True).print(table)
        for note in result["notes"]:
            print(f"note: {note}")
    return result


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.export import to_onnx
    from convforge.train import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else ckpt.path.with_suffix(".onnx")
    meta = {k: v for k, v in ckpt.meta.items()}
    report = to_onnx(ckpt.model, out, ckpt.input_size, opset=args.opset, dynamic_batch=args.dynamic_batch, meta=meta)
    report["checkpoint"] = str(ckpt.path)
    if not args.json:
        print(f"wrote {report['onnx']} (opset {report['opset']}, {'dynamic' if report['dynamic_batch'] else 'fixed'} "
              f"batch, {report['bytes'] / 1e6:.2f} MB) and {Path(report['onnx']).with_suffix('.json')}")
        print(f"ONNX Runtime vs PyTorch: max absolute logit difference {report['max_abs_diff']:.3g} (limit 1e-4)")
    return report


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from convforge.compress.pipeline import aligned_split
    from convforge.data import normalize
    from convforge.export import onnx_top1, quantize_int8
    from convforge.export.onnx import run_session, session
    from convforge.measure.bench import time_fn
    from convforge.train import load_checkpoint

    if not args.calib_data:
        raise ConfigError("static int8 quantization needs calibration data: pass --calib-data SPEC (e.g. "
                          "cifar10:DIR or imagefolder:DIR); its images set the activation ranges")
    ckpt = load_checkpoint(args.checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)
    calibration, calib_data = _calibration_images(args.calib_data, ckpt, args.calib_samples, ckpt.input_size)
    out = Path(args.out) if args.out else ckpt.path.with_name(ckpt.path.stem + "-int8.onnx")
    report = quantize_int8(ckpt.model, out, ckpt.input_size, calibration, meta=dict(ckpt.meta))
    if args.data and args.data != args.calib_data:
        from convforge.predict import load_data_for

        data = load_data_for(args.data)
    else:
        data = calib_data
    split = aligned_split(ckpt, data, args.split)
    images, labels = split.images, split.labels
    if args.eval_samples:
        images, labels = images[:args.eval_samples], labels[:args.eval_samples]
    x = normalize(images, ckpt.mean, ckpt.std)
    report["eval"] = {"data": data.spec, "split": args.split, "images": len(labels)}
    report["top1_fp32"] = onnx_top1(report["fp32_onnx"], x, labels, threads=args.threads)
    report["top1_int8"] = onnx_top1(report["onnx"], x, labels, threads=args.threads)
    with torch.inference_mode():
        torch_top1 = 100.0 * sum(int((ckpt.model(x[i:i + 256]).argmax(1) == labels[i:i + 256]).sum())
                                 for i in range(0, len(x), 256)) / max(len(x), 1)
    report["top1_torch"] = torch_top1
    batch = x[:256] if len(x) >= 256 else x.repeat((256 + len(x) - 1) // len(x), 1, 1, 1)[:256]
    speed = {}
    for name, fn in (("torch eager fp32", lambda: ckpt.model(batch)),
                     ("onnxruntime fp32", (lambda s: lambda: run_session(s, batch))(session(report["fp32_onnx"], args.threads))),
                     ("onnxruntime int8", (lambda s: lambda: run_session(s, batch))(session(report["onnx"], args.threads)))):
        with torch.inference_mode():
            times = time_fn(fn, warmup=2, repeats=5)
        speed[name] = 256 / sorted(times)[len(times) // 2]
    report["images_per_s_batch256"] = speed
    report["speedup_int8_vs_torch"] = speed["onnxruntime int8"] / speed["torch eager fp32"]
    if not args.json:
        _print_rows("int8 quantization (ONNX Runtime, QDQ)", [
            ("int8 model", report["onnx"]),
            ("calibration", f"{report['calibration_images']} images from {args.calib_data}"),
            ("top-1 fp32 (ONNX)", f"{report['top1_fp32']:.2f}%  (PyTorch {torch_top1:.2f}%)"),
            ("top-1 int8", f"{report['top1_int8']:.2f}%  ({report['top1_int8'] - report['top1_fp32']:+.2f} points, "
                           f"{len(labels)} {args.split} images)"),
            ("size", f"{report['bytes'] / 1e6:.2f} MB (fp32 {report['fp32_bytes'] / 1e6:.2f} MB)"),
            *[(f"{k} (batch 256)", f"{v:.0f} img/s") for k, v in speed.items()],
        ])
    return report


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.compress.pipeline import prune_checkpoint

    report = prune_checkpoint(
        args.checkpoint, args.method, target_macs=args.target_macs, sparsity=args.sparsity, min_share=args.min_share,
        round_to=args.round_to,
        finetune_epochs=args.finetune_epochs, data=args.data, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        out=args.out, dry_run=args.dry_run, seed=args.seed, amp=args.amp, channels_last=args.channels_last)
    if not args.json:
        _print_prune(report)
    return report


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


COMMANDS = {"bench": cmd_bench, "export": cmd_export, "quantize": cmd_quantize, "prune": cmd_prune}
