"""GPU parity: convforge's CIFAR recipe and airbench94 itself on the same CIFAR-10-JPEG tensors, in one run.

On a CUDA machine this trains

1. ``convforge train --recipe RECIPE --device cuda`` (default recipe cifar-30min) as a fresh process, evaluating
   after every epoch (as the recipe says, e.g. flip TTA), and
2. airbench94 (Keller Jordan, arXiv 2404.00498; the ``airbench`` package on PyPI, whose ``train94`` hard-codes
   CUDA, fp16 and channels_last) on the same images: convforge's decoded uint8 tensors, written as the
   ``cifar10/train.pt`` / ``test.pt`` files airbench's ``CifarLoader`` reads (NHWC uint8 images, labels,
   class names), so neither side decodes JPEGs differently,

and prints, for each, the time to 94% and 93% test top-1 and the per-epoch curve. The clocks differ and both
are shown: airbench times its training steps with CUDA events (no evaluation, no data loading); for convforge
the sum of the epochs' training time (the same scope) and the wall time from process start.

The package is not a dependency: ``pip install --no-deps airbench`` (0.1.8; it also imports torchvision, for
``transforms.Normalize`` and the CIFAR download it does not need here). Without CUDA, the package or
torchvision, the airbench part is skipped with the reason printed and recorded.

    python benchmarks/gpu_parity.py [--recipe cifar-30min] [--runs 1] [--no-record]
    python benchmarks/gpu_parity.py --smoke --no-record   # CPU: tiny synthetic subset, 1 epoch
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import convforge_json, extracted, read_records, record  # noqa: E402

from convforge.data import load  # noqa: E402

TARGETS = (94.0, 93.0)
SMOKE_DATA = "synthetic:classes=10,size=32,train=512,test=256"


def airbench_tensors(data: Any, folder: Path) -> dict[str, Path]:
    """Write ``data``'s train and test splits as airbench's ``CifarLoader`` files: ``{"images": uint8 (N, H, W, C),
    "labels": int64 (N,), "classes": [names]}`` in ``folder/train.pt`` and ``folder/test.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, name in (("train", "train.pt"), ("test", "test.pt")):
        part = data.split(split)
        images = torch.as_tensor(part.images)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise SystemExit(f"airbench needs uint8 RGB images (N, 3, H, W); {data.spec} {split} has "
                             f"{images.dtype} {tuple(images.shape)}")
        payload = {"images": images.permute(0, 2, 3, 1).contiguous(),
                   "labels": torch.as_tensor(part.labels, dtype=torch.int64), "classes": list(data.classes)}
        torch.save(payload, folder / name)
        files[split] = folder / name
    return files


def first_at(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """The time of the first (epoch, seconds, top-1 %) entry at or above ``target``."""
    return next((seconds for _, seconds, top1 in curve if top1 >= target), None)


def run_convforge(args: argparse.Namespace, spec: str, work: Path) -> dict[str, Any]:
    """One ``convforge train --recipe`` process; its per-epoch curve on both clocks and the times to TARGETS."""
    out = work / f"convforge-{args.recipe}-{int(time.time())}"
    extra = ["--epochs", "1", "--batch-size", "32", "--no-amp"] if args.smoke else []  # bf16 is slow on most CPUs
    summary, wall = convforge_json("train", "--recipe", args.recipe, "--data", spec, "--device", args.device,
                                   "--seed", str(args.seed), "--out", str(out), *extra, *args.extra.split())
    records = read_records(out)
    startup = wall - summary["wall_time_s"]  # process start to the engine's clock start
    train_clock, curve, wall_curve = 0.0, [], []
    for r in records:
        train_clock += r.get("train_time_s", 0.0)
        if "test_top1" in r:
            curve.append((r["epoch"], train_clock, r["test_top1"]))
            wall_curve.append((r["epoch"], startup + r["elapsed_s"], r["test_top1"]))
    return {"status": "ran", "recipe": args.recipe, "device": summary.get("device"), "epochs": summary["epochs"],
            "final_top1": summary["test_top1"], "wall_s": wall, "curve": curve, "wall_curve": wall_curve,
            "reached": {f"{t:g}": first_at(curve, t) for t in TARGETS},
            "reached_wall": {f"{t:g}": first_at(wall_curve, t) for t in TARGETS}, "run_dir": str(out)}


def airbench_unavailable() -> str | None:
    """Why airbench94 cannot run here, or None."""
    missing = [what for what, ok in (("CUDA device", torch.cuda.is_available()),
                                     ("airbench package (pip install --no-deps airbench)",
                                      importlib.util.find_spec("airbench") is not None),
                                     ("torchvision (airbench imports it)",
                                      importlib.util.find_spec("torchvision") is not None)) if not ok]
    return None if not missing else "airbench94 skipped: no " + ", no ".join(missing)


def run_airbench(args: argparse.Namespace, files: dict[str, Path]) -> dict[str, Any]:
    """airbench94's own training (``train94``) on the written tensors, ``args.runs`` times after its warm-up."""
    airbench = importlib.import_module("airbench")
    utils = importlib.import_module("airbench.utils")
    rows: list[dict[str, Any]] = []
    original = utils.print_training_details

    def capture(variables: dict[str, Any], is_final_entry: bool) -> None:
        if variables.get("run") != "warmup":
            rows.append({k: variables.get(k) for k in ("epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc",
                                                       "total_time_seconds")})
        original(variables, is_final_entry)

    runs = []
    folder = files["train"].parent
    with contextlib.chdir(folder.parent):  # train94 reads its test split from ./cifar10
        n = len(torch.load(files["train"], weights_only=True)["labels"])
        loader = airbench.CifarLoader(folder.name, train=True, batch_size=min(1024, n // 2),
                                      aug={"flip": True, "translate": 2}, altflip=True)
        epochs = {"epochs": 1} if args.smoke else {}
        utils.print_training_details = capture
        try:
            airbench.warmup94(loader, **epochs)
            for run in range(args.runs):
                rows.clear()
                start = time.perf_counter()
                airbench.train94(loader, run=run, **epochs)
                runs.append(_airbench_run(rows, time.perf_counter() - start))
        finally:
            utils.print_training_details = original
    return {"status": "ran", "runs": runs, "version": importlib.metadata.version("airbench")}


def _airbench_run(rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """One run's curve (per epoch: total training seconds, test top-1 without TTA; last: with TTA)."""
    curve = [(r["epoch"], r["total_time_seconds"], 100 * r["val_acc"]) for r in rows
             if isinstance(r["epoch"], int) and r["val_acc"] is not None]
    final = next((r for r in rows if r["epoch"] == "eval"), None)
    if final is not None and final["tta_val_acc"] is not None:
        curve.append(("tta", final["total_time_seconds"], 100 * final["tta_val_acc"]))
    return {"curve": curve, "final_top1": curve[-1][2] if curve else None, "wall_s": wall,
            "reached": {f"{t:g}": first_at(curve, t) for t in TARGETS}}


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.1f} s"


def _lines(args: argparse.Namespace, spec: str, ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    lines = [f"Data: {spec}" + (" (smoke: tiny synthetic subset, 1 epoch)" if args.smoke else
                                " (CIFAR-10-JPEG, 50,000 train / 10,000 test, decoded once by convforge)"), "",
             "| system | device | final test top-1 | time to 94% | time to 93% | wall (process) |",
             "|---|---|---:|---:|---:|---:|",
             f"| convforge {args.recipe} | {ours['device']} | {ours['final_top1']:.2f}% | "
             f"{_seconds(ours['reached']['94'])} | {_seconds(ours['reached']['93'])} | {ours['wall_s']:.0f} s |"]
    if theirs["status"] == "ran":
        for k, run in enumerate(theirs["runs"]):
            lines.append(f"| airbench94 run {k} | cuda | {run['final_top1']:.2f}% | {_seconds(run['reached']['94'])} | "
                         f"{_seconds(run['reached']['93'])} | {run['wall_s']:.0f} s |")
    lines += ["", "Times to accuracy count training time only (airbench: CUDA events around its training steps; "
              "convforge: the sum of its epochs' train_time_s); convforge from process start: "
              + ", ".join(f"{t}% {_seconds(v)}" for t, v in ours["reached_wall"].items()) + ".",
              "", f"convforge per epoch (training seconds, test top-1): "
              + ", ".join(f"{e}: {s:.1f} s {a:.2f}%" for e, s, a in ours["curve"])]
    if theirs["status"] == "ran":
        for k, run in enumerate(theirs["runs"]):
            lines.append(f"airbench94 run {k} per epoch (training seconds, test top-1; 'tta': final, with its "
                         "multi-crop TTA): " + ", ".join(f"{e}: {s:.1f} s {a:.2f}%" for e, s, a in run["curve"]))
    else:
        lines.append(f"{theirs['reason']}.")
    lines.append(f"Command: `python benchmarks/gpu_parity.py {args.command_line}`")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="cifar-30min", help="convforge recipe (default: cifar-30min)")
    parser.add_argument("--data", help="data spec (default: CIFAR-10-JPEG; --smoke: a tiny synthetic set)")
    parser.add_argument("--device", help="convforge's device (default: cuda when available, else cpu)")
    parser.add_argument("--runs", type=int, default=1, help="airbench94 runs after its warm-up (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", default="", help="extra `convforge train` options")
    parser.add_argument("--work", default="/tmp/convforge-gpu-parity")
    parser.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch; runs on a CPU")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    args.command_line = " ".join(sys.argv[1:] if argv is None else argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device: this benchmark compares GPU times; run it on a CUDA machine, or use --smoke")
    work = Path(args.work)
    spec = args.data or (SMOKE_DATA if args.smoke else f"imagefolder:{extracted('cifar10-jpeg.tar.gz', 'cifar10-jpeg')}")
    data = load(spec, log=print)
    files = airbench_tensors(data, work / "cifar10")
    ours = run_convforge(args, spec, work)
    reason = airbench_unavailable()
    theirs = {"status": "skipped", "reason": reason} if reason else run_airbench(args, files)
    if reason:
        print(reason, flush=True)
    result = {"data": spec, "files": {k: str(v) for k, v in files.items()}, "convforge": ours, "airbench": theirs,
              "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "cpu_threads": os.cpu_count()}
    (work / "parity.json").write_text(json.dumps(result, indent=1))
    record("GPU parity: convforge vs airbench94 on CIFAR-10-JPEG" + (" (smoke)" if args.smoke else ""),
           _lines(args, spec, ours, theirs), save=not args.no_record)
    return result


if __name__ == "__main__":
    main()
