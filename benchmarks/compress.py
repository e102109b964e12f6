"""Compress and deploy ResNet-56 on CIFAR-10-JPEG: structured pruning to <= 50% MACs with fine-tuning, against
the like-for-like control, and static int8 with ONNX Runtime, all measured on this machine.

The unpruned model is the reference ResNet-56 of ../shared/reference-weights (trained on the original
CIFAR-10 by akamaster/pytorch_resnet_cifar10, ImageNet mean/std), evaluated on the JPEG re-encoded test set.

1. prune: ``convforge.compress`` pipeline to --target-macs of the MACs with --method (l1-filter, ...,
   group-l2: DepGraph's group importance; --global-pruning ranks channels across groups, --normalizer
   mean|max), optionally after --sparsity-epochs of training with the group regulariser (--sparsity-reg),
   in --steps prune/fine-tune steps, fine-tuned --finetune-epochs in all on the JPEG train split (SGD
   Nesterov, cosine from --lr, bf16 autocast, channels_last);
2. control: the unpruned model fine-tuned with the same recipe for the same number of epochs
   (--sparsity-epochs + --finetune-epochs): the like-for-like baseline;
3. speed: throughput at batch --speed-batch of the unpruned and the pruned model, PyTorch eager, PyTorch with
   BatchNorm folded and channels_last, and ONNX Runtime, timed in interleaved rounds;
4. int8: the unpruned model with BatchNorm folded, QDQ int8 (per-channel weights) calibrated on 512 train
   images; top-1 fp32 vs int8 on the full test split; throughput vs PyTorch eager fp32.

Stages write to --work (default /tmp/convforge-compress-bench) and are reused on a second run, so the
benchmark can be split into invocations of under 30 minutes:

    python benchmarks/compress.py [--finetune-epochs 2] [--threads 2] [--no-record]
    python benchmarks/compress.py --method group-l2 --global-pruning --normalizer max --sparsity-epochs 5 \\
        --sparsity-reg 5e-4 --finetune-epochs 20 --lr 0.02 --no-onnx      # the Group method, 25-epoch budget

--smoke runs everything on a tiny subset (or --data SPEC) for 1 epoch each, without ONNX, to show it works.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, extracted, record  # noqa: E402

from convforge.compress.pipeline import prune_checkpoint  # noqa: E402
from convforge.data import load, normalize  # noqa: E402
from convforge.measure import count_macs, count_params  # noqa: E402
from convforge.measure.bench import time_fn  # noqa: E402
from convforge.models import create_model, load_foreign_weights  # noqa: E402
from convforge.train import load_checkpoint  # noqa: E402
from convforge.train.checkpoint import save_checkpoint  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what the reference weights were trained with
WEIGHTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}


def reference_checkpoint(work: Path, data, name: str) -> Path:
    """The reference weights of ``name`` as a convforge checkpoint (random weights when the file is missing)."""
    path = work / f"{name}-reference.safetensors"
    if path.is_file():
        return path
    model = create_model(name, num_classes=10)
    weights = SHARED / "reference-weights" / WEIGHTS[name]
    if weights.is_file():
        load_foreign_weights(model, weights)
    else:
        print(f"note: {weights} not found: {name} keeps its random initialisation", flush=True)
    meta = {"model": {"name": name, "args": {}, "num_classes": 10, "in_chans": 3},
            "classes": list(data.classes), "input_size": [3, 32, 32],
            "normalization": {"mean": list(MEAN), "std": list(STD)},
            "data": {"spec": data.spec}, "weights": f"akamaster/pytorch_resnet_cifar10 {WEIGHTS[name]}"}
    return save_checkpoint(path, model.eval(), meta)


def smoke_subset(work: Path, per_class: dict[str, int]) -> str:
    """An image folder of the first ``per_class[split]`` CIFAR-10-JPEG images of every class and split."""
    root = extracted("cifar10-jpeg.tar.gz", "cifar10-jpeg")
    target = work / "cifar10-jpeg-subset"
    if not (target / ".complete").is_file():
        for split, count in per_class.items():
            for folder in sorted((root / split).iterdir()):
                (target / split / folder.name).mkdir(parents=True, exist_ok=True)
                for file in sorted(folder.iterdir())[:count]:
                    shutil.copy(file, target / split / folder.name / file.name)
        (target / ".complete").write_text("ok\n")
    return f"imagefolder:{target}"


def _tag(args: argparse.Namespace) -> str:
    tag = f"{args.model}-{args.method}-{args.target_macs:g}-r{args.round_to}-ft{args.finetune_epochs:g}"
    if args.steps > 1:
        tag += f"-k{args.steps}"
    if args.global_pruning:
        tag += f"-global-{args.normalizer}"
    if args.sparsity_epochs:
        tag += f"-sl{args.sparsity_epochs}x{args.sparsity_reg:g}"
    if args.distill:
        tag += "-kd"
    return tag + f"-lr{args.lr:g}"


def _cached(path: Path, run) -> dict:
    if not path.is_file():
        start = time.perf_counter()
        report = run()
        report["wall_s"] = time.perf_counter() - start
        path.write_text(json.dumps(report))
    return json.loads(path.read_text())


def prune_stage(args: argparse.Namespace, ref: Path, data, work: Path) -> tuple[dict, Path]:
    """Prune (after the optional regularised phase) and fine-tune; the report and the pruned checkpoint."""
    pruned_path = work / f"{_tag(args)}.safetensors"
    report = _cached(pruned_path.with_suffix(".report.json"), lambda: prune_checkpoint(
        ref, args.method, target_macs=args.target_macs, round_to=args.round_to, global_ranking=args.global_pruning,
        normalizer=args.normalizer, sparsity_epochs=args.sparsity_epochs, sparsity_reg=args.sparsity_reg,
        finetune_epochs=args.finetune_epochs, steps=args.steps, distill=args.distill, data=data.spec, lr=args.lr,
        out=pruned_path, amp=not args.fp32_finetune, channels_last=True, threads=args.threads, quiet=args.smoke,
        log=lambda m: print(m, flush=True)))
    return report, pruned_path


def control_stage(args: argparse.Namespace, ref: Path, data, work: Path, run: bool = True,
                  distill: bool | None = None) -> dict | None:
    """The unpruned model fine-tuned with the same recipe for the same number of epochs, distilling from the
    reference throughout when ``distill`` (default: ``--distill``); ``run`` False: only an earlier stage's
    result, if any."""
    epochs = args.sparsity_epochs + args.finetune_epochs
    distill = args.distill if distill is None else distill
    path = work / f"{args.model}-unpruned-ft{epochs:g}{'-kd' if distill else ''}-lr{args.lr:g}.safetensors"
    if not run and not path.with_suffix(".report.json").is_file():
        return None
    return _cached(path.with_suffix(".report.json"), lambda: prune_checkpoint(
        ref, "l1-filter", sparsity=0.0, finetune_epochs=epochs, distill=distill, data=data.spec, lr=args.lr, out=path,
        amp=not args.fp32_finetune, channels_last=True, threads=args.threads, quiet=args.smoke,
        log=lambda m: print(m, flush=True)))


def fused_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with BatchNorm folded into the convolutions, in channels_last memory format."""
    return copy.deepcopy(model).eval().fuse().to(memory_format=torch.channels_last)


def measure_speed(models: dict, x: torch.Tensor, args: argparse.Namespace, work: Path) -> tuple[dict, dict]:
    """images/s per (backend, model), each runner timed in interleaved rounds (A, B, C, ..., A, B, C, ...) so
    that load from other processes on this shared machine hits all of them alike; p50 over the rounds.
    Also the largest |logit| difference of the BN-folded channels_last models against eager PyTorch."""
    def eager(model, inputs):
        def run():
            with torch.inference_mode():
                model(inputs)
        return run

    x_cl = x.contiguous(memory_format=torch.channels_last)
    runners, fused_diff = {}, {}
    for name, model in models.items():
        fused = fused_channels_last(model)
        with torch.inference_mode():
            fused_diff[name] = float((fused(x_cl) - model.eval()(x)).abs().max())
        runners[("torch", name)] = eager(model, x)
        runners[("torch-fused", name)] = eager(fused, x_cl)
    if not args.no_onnx:
        from convforge.export import session, to_onnx
        from convforge.export.onnx import run_session

        for name, model in models.items():
            path = work / f"speed-{name}.onnx"
            to_onnx(model, path, tuple(x.shape[1:]), dynamic_batch=True)
            runners[("onnxruntime", name)] = (lambda s: lambda: run_session(s, x))(session(path, args.threads))
    times: dict = {key: [] for key in runners}
    for fn in runners.values():
        time_fn(fn, warmup=2, repeats=1)
    for _ in range(args.repeats):
        for key, fn in runners.items():
            times[key] += time_fn(fn, warmup=0, repeats=1)
    rows = {key: {"p50_ms": 1000 * float(np.percentile(t, 50)), "p90_ms": 1000 * float(np.percentile(t, 90)),
                  "images_per_s": len(x) / float(np.percentile(t, 50))} for key, t in times.items()}
    for key, row in rows.items():
        print(f"{key[0]:>17} {key[1]:>8} batch {len(x)}: p50 {row['p50_ms']:.1f} ms  p90 {row['p90_ms']:.1f} ms  "
              f"{row['images_per_s']:.0f} img/s")
    return rows, fused_diff


def int8_stage(base: torch.nn.Module, data, x: torch.Tensor, args: argparse.Namespace, work: Path) -> list[str]:
    """Static int8 of the unpruned model (ONNX Runtime QDQ), calibrated on 512 train images: the table lines."""
    from convforge.export import onnx_top1, quantize_int8, session
    from convforge.export.onnx import run_session

    gen = torch.Generator().manual_seed(0)
    calib_idx = torch.randperm(len(data.train), generator=gen)[:512]
    calibration = normalize(data.train.images[calib_idx], MEAN, STD)
    int8 = quantize_int8(base, work / f"{args.model}-int8.onnx", (3, 32, 32), calibration)
    test_x = normalize(data.test.images, MEAN, STD)
    top1 = {"fp32": onnx_top1(int8["fp32_onnx"], test_x, data.test.labels, threads=args.threads),
            "int8": onnx_top1(int8["onnx"], test_x, data.test.labels, threads=args.threads)}
    speed = {}
    for key in ("fp32", "int8"):
        sess = session(int8["fp32_onnx" if key == "fp32" else "onnx"], args.threads)
        speed[key] = len(x) / float(np.percentile(time_fn(lambda: run_session(sess, x), 2, args.repeats), 50))
    with torch.inference_mode():
        eager = len(x) / float(np.percentile(time_fn(lambda: base(x), 2, args.repeats), 50))
    return ["", "int8 (ONNX Runtime static QDQ, per-channel int8 weights, BatchNorm folded, 512 calibration images):",
            "", f"| model | top-1 | images/s at batch {len(x)} |", "|---|---:|---:|",
            f"| ONNX Runtime fp32 (BN-folded export) | {top1['fp32']:.2f}% | {speed['fp32']:.0f} |",
            f"| ONNX Runtime int8 | {top1['int8']:.2f}% | {speed['int8']:.0f} |", "",
            f"- int8 vs PyTorch eager fp32 ({eager:.0f} img/s): {speed['int8'] / eager:.2f}x throughput (target >= "
            f"2.5x), top-1 int8 vs ONNX fp32 {top1['int8'] - top1['fp32']:+.2f} points; int8 file "
            f"{int8['bytes'] / 1e6:.2f} MB vs fp32 {int8['fp32_bytes'] / 1e6:.2f} MB"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet56", choices=sorted(WEIGHTS))
    parser.add_argument("--method", default="l1-filter")
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=8,
                        help="keep a multiple of this many channels per group (vectorised CPU kernels like 8)")
    parser.add_argument("--global-pruning", action="store_true", help="rank channels across groups")
    parser.add_argument("--normalizer", default="mean", choices=("mean", "max"))
    parser.add_argument("--sparsity-epochs", type=int, default=0, help="regularised epochs before pruning")
    parser.add_argument("--sparsity-reg", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=1, help="prune/fine-tune steps")
    parser.add_argument("--distill", action="store_true",
                        help="fine-tune on the reference's soft targets too: the pruned model after pruning, the "
                             "control for all its epochs")
    parser.add_argument("--finetune-epochs", type=float, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--fp32-finetune", action="store_true", help="fine-tune in fp32 (default: bf16 autocast)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--speed-batch", type=int, default=256)
    parser.add_argument("--work", default="/tmp/convforge-compress-bench")
    parser.add_argument("--stage", choices=("all", "prune", "control", "measure"), default="all",
                        help="control: fine-tune the unpruned model with the same recipe (the like-for-like baseline)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime backends and int8")
    parser.add_argument("--data", help="data spec instead of CIFAR-10-JPEG (e.g. for --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny subset (20/10 images per class, or --data), 1 epoch per phase, no ONNX")
    parser.add_argument("--no-record", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    args.command_line = " ".join(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.finetune_epochs, args.repeats, args.speed_batch, args.no_onnx = 1, 2, 32, True
        args.sparsity_epochs = min(args.sparsity_epochs, 1)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = args.data or (smoke_subset(work, {"train": 20, "test": 10}) if args.smoke else
                         f"imagefolder:{extracted('cifar10-jpeg.tar.gz', 'cifar10-jpeg')}")
    data = load(spec, log=print)
    ref = reference_checkpoint(work, data, args.model)
    report, pruned_path = prune_stage(args, ref, data, work) if args.stage != "control" else ({}, None)
    if args.stage == "prune":
        return report
    control = control_stage(args, ref, data, work, run=args.stage in ("all", "control"))
    if args.stage == "control":
        return control
    base, pruned = load_checkpoint(ref).model.eval(), load_checkpoint(pruned_path).model.eval()
    x = normalize(data.test.images[:args.speed_batch], MEAN, STD)
    if len(x) < args.speed_batch:
        x = x.repeat((args.speed_batch + len(x) - 1) // len(x), 1, 1, 1)[:args.speed_batch]
    rows, fused_diff = measure_speed({"unpruned": base, "pruned": pruned}, x, args, work)
    summary = _summary(args, report, control, rows, fused_diff, base)
    plain_control = control_stage(args, ref, data, work, run=False, distill=False) if args.distill else None
    summary["top1_control_without_distillation"] = plain_control.get("top1_after") if plain_control else None
    (work / f"{_tag(args)}.summary.json").write_text(json.dumps(summary, indent=1))
    lines = _lines(args, summary, report, control)
    if not args.no_onnx:
        lines += int8_stage(base, data, x, args, work)
    record(f"Compress and deploy: {args.model} on CIFAR-10-JPEG" + (" (smoke)" if args.smoke else ""), lines,
           save=not args.no_record)
    return summary


def _summary(args, report: dict, control: dict | None, rows: dict, fused_diff: dict, base) -> dict:
    speedup = {backend: rows[(backend, "pruned")]["images_per_s"] / rows[(backend, "unpruned")]["images_per_s"]
               for backend, name in rows if name == "pruned"}
    ft = report["history"][-1].get("finetune", {})
    return {"model": args.model, "method": args.method, "tag": _tag(args), "macs_ratio": report["macs_ratio"],
            "macs_before": report["macs_before"], "macs_after": report["macs_after"],
            "params_before": count_params(base), "params_after": report["params_after"],
            "top1_before": report.get("top1_before"), "top1_regularized": report.get("top1_regularized"),
            "top1_pruned": report["history"][0].get("top1_pruned"), "top1_after": report.get("top1_after"),
            "top1_control": control.get("top1_after") if control else None,
            "budget_epochs": args.sparsity_epochs + args.finetune_epochs, "finetune": ft,
            "sparsity_training": report.get("sparsity_training"), "prune_wall_s": report.get("wall_s"),
            "control_wall_s": control.get("wall_s") if control else None,
            "speed": {f"{b}/{n}": r for (b, n), r in rows.items()}, "speedup": speedup,
            "fused_max_abs_diff": fused_diff}


def _lines(args, s: dict, report: dict, control: dict | None) -> list[str]:
    def ips(backend, name):
        row = s["speed"].get(f"{backend}/{name}")
        return f"{row['images_per_s']:.0f} img/s" if row else "-"

    backends = [b for b in ("torch", "torch-fused", "onnxruntime") if f"{b}/pruned" in s["speed"]]
    how = (f"{args.method}, --target-macs {args.target_macs:g}, --round-to {args.round_to}"
           + (f", --global-pruning --normalizer {args.normalizer}" if args.global_pruning else "")
           + (f", --sparsity-epochs {args.sparsity_epochs} --sparsity-reg {args.sparsity_reg:g}" if args.sparsity_epochs
              else "") + (f", --steps {args.steps}" if args.steps > 1 else "")
           + (", --distill: the fine-tune also learns the unpruned reference's soft targets (weight 0.5, "
              "temperature 4), and so does the control, for all its epochs" if args.distill else ""))
    head = "| model | params | MACs | top-1 | " + " | ".join(f"{b} b{args.speed_batch}" for b in backends) + " |"
    lines = [f"{args.model} (reference weights, {s['params_before']:,} params, {s['macs_before'] / 1e6:.1f} M MACs) on "
             f"CIFAR-10-JPEG test ({'subset' if args.smoke else '10,000 images'}); threads={args.threads}; latency = "
             f"p50 of {args.repeats} interleaved rounds after warm-up (torch-fused: BatchNorm folded, channels_last).",
             "", f"Structured pruning ({how}; option-A pad channels fixed):", "", head,
             "|---|---:|---:|---:|" + "---:|" * len(backends),
             f"| unpruned | {s['params_before']:,} | {s['macs_before'] / 1e6:.1f} M | {s['top1_before']:.2f}% | "
             + " | ".join(ips(b, "unpruned") for b in backends) + " |"]
    if s["top1_regularized"] is not None:
        lines.append(f"| regularised ({args.sparsity_epochs} epoch(s)), not pruned | {s['params_before']:,} | "
                     f"{s['macs_before'] / 1e6:.1f} M | {s['top1_regularized']:.2f}% |" + " |" * len(backends))
    lines += [f"| pruned, no fine-tune | {s['params_after']:,} | {s['macs_after'] / 1e6:.1f} M "
              f"({100 * s['macs_ratio']:.1f}%) | {s['top1_pruned']:.2f}% |" + " |" * len(backends),
              f"| pruned + {args.finetune_epochs:g} epoch(s) fine-tune | {s['params_after']:,} | "
              f"{s['macs_after'] / 1e6:.1f} M | {s['top1_after']:.2f}% | " + " | ".join(ips(b, "pruned") for b in backends)
              + " |"]
    if control:
        lines.append(f"| unpruned + {s['budget_epochs']:g} epoch(s), same recipe (control) | {control['params_after']:,} | "
                     f"{control['macs_after'] / 1e6:.1f} M | {control['top1_after']:.2f}% |" + " |" * len(backends))
    if s.get("top1_control_without_distillation") is not None:
        lines.append(f"| control without distillation (earlier run) | {s['params_before']:,} | "
                     f"{s['macs_before'] / 1e6:.1f} M | {s['top1_control_without_distillation']:.2f}% |"
                     + " |" * len(backends))
    ft = s["finetune"]
    lines += ["", f"- top-1 vs the unpruned reference: {s['top1_after'] - s['top1_before']:+.2f} points"
              + (f"; vs the control (same {s['budget_epochs']:g}-epoch budget): "
                 f"{s['top1_after'] - s['top1_control']:+.2f} points (target: within 1.0)" if control else ""),
              "- speed-up at batch {}: {} (target >= 1.6x BN folded, channels_last)".format(
                  args.speed_batch, ", ".join(f"{b} {s['speedup'][b]:.2f}x" for b in backends)),
              f"- BN-folded channels_last vs eager: max |logit difference| "
              f"{max(s['fused_max_abs_diff'].values()):.2g}",
              f"- budget: {s['budget_epochs']:g} epochs for both ({args.sparsity_epochs} regularised + "
              f"{args.finetune_epochs:g} fine-tune for the pruned model; {ft.get('steps', 0)} steps of batch "
              f"{ft.get('batch_size', 0)} in the last fine-tune; SGD Nesterov, lr {args.lr:g} cosine, "
              f"{'bf16 autocast' if ft.get('amp') else 'fp32'}, channels_last); wall time: prune stage "
              f"{(s['prune_wall_s'] or 0) / 60:.1f} min" + (f", control {(s['control_wall_s'] or 0) / 60:.1f} min"
                                                            if control else ""),
              "", "Against Torch-Pruning's published ResNet-56/CIFAR-10 results (VainF/Torch-Pruning, "
              "benchmarks/readme.md: 2.12x MAC reduction, i.e. 47% of the MACs, base 93.53% on the original CIFAR-10, "
              "100 epochs of GPU fine-tuning at lr 0.01): L1 92.93% (-0.60), BN 93.29% (-0.24), Group 93.91% (+0.38; "
              "group L2 importance normalised by the maximum, global pruning, regulariser 5e-4). The bases differ "
              "(JPEG artefacts cost the reference weights ~10 points), so the like-for-like figure here is the delta "
              "against the control.",
              f"Command: `python benchmarks/compress.py {args.command_line}`"]
    return lines


if __name__ == "__main__":
    main()
