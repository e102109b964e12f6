"""Adversarial robustness on CIFAR-10-JPEG: an adversarially trained network and its normally trained twin.

1. ``convforge train --recipe cifar-robust`` (FGSM with random start, Wong et al. 2020) as a fresh process on a
   warm decoding cache: wall time from process start, clean and PGD-10 accuracy per epoch.
2. The twin: the same recipe with ``--adv-train none`` (normal training, same network, epochs and schedule).
3. ``convforge robust`` on each twin's best checkpoint: PGD-20 at Linf 8/255 on the full test split; PGD-20 and
   the standard AutoAttack (full iteration counts) on a seeded subset; a PGD accuracy-vs-eps curve on the subset;
   the 15 corruptions x 5 severities on the full test split with the twin as the mCE baseline.
4. ``convforge filters`` of both twins and the distribution shift between them (the seed study).

    python benchmarks/robustness.py [--stage all|train|eval] [--samples 1000] [--no-record]

Stages can run apart: ``--stage train`` needs a quiet machine (its wall time is the figure); ``--stage eval``
reads the run directories of the last training (``--runs DIR``) and is not timed against a budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import convforge_json, extracted, read_records, record  # noqa: E402

BUDGET_S = 3600.0
RUNS = Path("/tmp/convforge-bench-runs/robustness")


def train_twins(data: Path, runs: Path, extra: list[str]) -> dict[str, dict]:
    """Train the adversarial run first (its wall time is the budgeted figure), then the normal twin."""
    results = {}
    for name, options in (("adversarial", []), ("normal", ["--adv-train", "none"])):
        out = runs / name
        summary, wall = convforge_json("train", "--recipe", "cifar-robust", "--data", f"imagefolder:{data}",
                                       "--out", str(out), *options, *extra)
        startup = wall - summary["wall_time_s"]
        curve = [(r["epoch"], startup + r["elapsed_s"], r.get("test_top1"), r.get("test_pgd10_top1"))
                 for r in read_records(out) if "test_top1" in r]
        results[name] = {"summary": summary, "wall": wall, "curve": curve}
    (runs / "training.json").write_text(json.dumps(results, indent=1))
    return results


def evaluate_twins(data: Path, runs: Path, samples: int) -> dict[str, dict]:
    """PGD-20 (full test), PGD-20 + AutoAttack (subset), the eps curve (subset), corruptions (full test),
    saliency maps of four test images, the filters of both twins and their distribution shift."""
    spec = f"imagefolder:{data}"
    images = [str(next(iter(sorted(folder.iterdir())))) for folder in sorted((data / "test").iterdir())[:4]]
    results: dict[str, dict] = {}
    for name in ("adversarial", "normal"):
        run = runs / name
        ckpt = str(run / "best.safetensors")
        subset, subset_wall = convforge_json("robust", ckpt, "--data", spec, "--attack", "pgd,autoattack",
                                             "--steps", "20", "--eps", "8/255", "--samples", str(samples),
                                             "--out", str(run / "robust"))
        full, full_wall = convforge_json("robust", ckpt, "--data", spec, "--attack", "pgd", "--steps", "20",
                                         "--eps", "8/255", "--out", str(run / "robust-pgd20-full"))
        curve, _ = convforge_json("robust", ckpt, "--data", spec, "--attack", "fgsm,pgd", "--steps", "20",
                                  "--eps", "1/255,2/255,4/255,8/255,16/255", "--samples", str(samples),
                                  "--out", str(run / "robust-curve"))
        filters, _ = convforge_json("filters", ckpt, "--out", str(run / "filters"))
        explain, _ = convforge_json("explain", ckpt, *images, "--method", "all", "--out", str(run / "explain"))
        results[name] = {"autoattack": subset, "autoattack_wall": subset_wall, "pgd20_full": full,
                         "pgd20_full_wall": full_wall, "curve": curve, "filters": filters, "explain": explain}
    corruptions, corruption_wall = convforge_json(
        "robust", str(runs / "adversarial" / "best.safetensors"), "--data", spec, "--corruptions", "all",
        "--baseline", str(runs / "normal" / "best.safetensors"), "--out", str(runs / "adversarial" / "corruptions"))
    results["corruptions"] = {"result": corruptions, "wall": corruption_wall}
    shift, _ = convforge_json("filters", str(runs / "normal" / "best.safetensors"), "--compare",
                              str(runs / "adversarial" / "best.safetensors"), "--no-pictures",
                              "--out", str(runs / "filters-compare"))
    results["filter_shift"] = shift
    (runs / "evaluation.json").write_text(json.dumps(results, indent=1))
    return results


def training_lines(training: dict[str, dict]) -> list[str]:
    lines = ["| run | epochs | test top-1 (clean) | PGD-10 (1,000 images) | best epoch | wall time |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, run in training.items():
        s = run["summary"]
        last = run["curve"][-1]
        lines.append(f"| {name} | {s['epochs']} | {last[2]:.2f}% | "
                     f"{'-' if last[3] is None else f'{last[3]:.2f}%'} | {s['best_epoch']} | {run['wall']:.0f} s |")
    for name, run in training.items():
        lines.append("")
        lines.append(f"{name} per epoch (wall s from process start, clean %, PGD-10 %): " + ", ".join(
            f"{e}: {t:.0f} s {a:.2f}" + (f"/{p:.2f}" if p is not None else "") for e, t, a, p in run["curve"]))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("all", "train", "eval"), default="all")
    parser.add_argument("--samples", type=int, default=1000, help="seeded test images for AutoAttack and the curve")
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--extra", default="", help="extra `convforge train` options for both twins")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    data = extracted("cifar10-jpeg.tar.gz", "cifar10-jpeg")
    from convforge.data import load

    load(f"imagefolder:{data}", log=print)  # warm the decoding cache before any clock starts
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "train"):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        training = train_twins(data, args.runs / stamp, args.extra.split())
        (args.runs / "latest").unlink(missing_ok=True)
        (args.runs / "latest").symlink_to(args.runs / stamp)
        record("CIFAR-10-JPEG adversarial training (cifar-robust) and its normal twin",
               training_lines(training) + ["", "Command: `python benchmarks/robustness.py --stage train`"],
               save=not args.no_record)
    if args.stage in ("all", "eval"):
        runs = (args.runs / "latest").resolve()
        results = evaluate_twins(data, runs, args.samples)
        print(json.dumps(results, indent=1)[:3000])
        print(f"evaluation written to {runs / 'evaluation.json'}")


if __name__ == "__main__":
    main()
