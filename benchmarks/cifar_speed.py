"""CIFAR-10-JPEG time to accuracy: how soon a named recipe reaches 85% and 90% test top-1, and the best in 30 min.

Each recipe runs as a fresh `convforge train --recipe NAME` process on a warm decoding cache, evaluating
(with flip TTA, as the recipe says) after every epoch. The time to X% is the wall time from process start
to the end of the first evaluation at or above X% (the run's per-epoch ``elapsed_s`` plus the measured
start-up: imports, data loading). "Best in 30 minutes" is the best evaluation that finished within
1,800 s of process start.

    python benchmarks/cifar_speed.py [--recipes cifar-fast,cifar-30min] [--seeds 0,1,2] [--no-record]

With several seeds every recipe runs once per seed (one after the other, never two at once) and a summary
line gives the mean and spread (min..max) of the final accuracy and of the times to each target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import convforge_json, extracted, read_records, record  # noqa: E402

TARGETS = (85.0, 90.0, 93.0)
BUDGET_S = 1800.0


def run_recipe(name: str, data: Path, extra: list[str], seed: int | None = None) -> dict:
    out = Path(f"/tmp/convforge-bench-runs/cifar-{name}-{int(time.time())}")
    seeded = [] if seed is None else ["--seed", str(seed)]
    summary, wall = convforge_json("train", "--recipe", name, "--data", f"imagefolder:{data}", "--out", str(out),
                                   *seeded, *extra)
    records = read_records(out)
    startup = wall - summary["wall_time_s"]  # process start to the engine's clock start
    curve = [(r["epoch"], startup + r["elapsed_s"], r["test_top1"]) for r in records if "test_top1" in r]
    reached = {t: next((s for _, s, a in curve if a >= t), None) for t in TARGETS}
    within = [a for _, s, a in curve if s <= BUDGET_S]
    return {"name": name, "seed": seed, "summary": summary, "wall": wall, "curve": curve, "reached": reached,
            "best_in_budget": max(within) if within else None, "out": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="cifar-fast,cifar-30min")
    parser.add_argument("--extra", default="", help="extra `convforge train` options for every run")
    parser.add_argument("--seeds", default="", help="comma-separated seeds: one run per recipe and seed "
                                                      "(default: the recipe's seed, one run)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    data = extracted("cifar10-jpeg.tar.gz", "cifar10-jpeg")

    from convforge.data import load

    t = time.perf_counter()
    load(f"imagefolder:{data}", log=print)
    print(f"cache warm-up: {time.perf_counter() - t:.1f} s", flush=True)

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    results = [run_recipe(name, data, args.extra.split(), seed) for name in args.recipes.split(",") for seed in seeds]

    def seconds(value):
        return "not reached" if value is None else f"{value:.0f} s ({value / 60:.1f} min)"

    lines = ["| recipe | seed | model | epochs | final test top-1 | " + " | ".join(f"time to {t:.0f}%" for t in TARGETS)
             + " | best within 30 min | total wall |", "|---|---:|---|---:|---:|" + "---:|" * len(TARGETS) + "---:|---:|"]
    for r in results:
        s = r["summary"]
        lines.append(f"| {r['name']} | {'recipe' if r['seed'] is None else r['seed']} | {s['model']} | {s['epochs']} | {s['test_top1']:.2f}% | "
                     + " | ".join(seconds(r["reached"][t]) for t in TARGETS)
                     + f" | {r['best_in_budget']:.2f}% | {r['wall']:.0f} s |")
    lines.append("")
    lines += seed_summaries(results)
    for r in results:
        lines.append(f"{r['name']} (seed {r['seed']}) per epoch (wall time from process start, test top-1 with flip TTA): "
                     + ", ".join(f"{e}: {s:.0f} s {a:.2f}%" for e, s, a in r["curve"]))
        lines.append("")
    lines.append("Data: CIFAR-10-JPEG (quality ~75 re-encoding, 50,000 train / 10,000 test): not comparable with "
                 "published CIFAR-10 figures. Warm decoding cache; times include process start-up and data loading.")
    lines.append(f"Command: `python benchmarks/cifar_speed.py --recipes {args.recipes}"
                 + (f" --seeds {args.seeds}`" if args.seeds else "`")
                 + (f" --extra '{args.extra}'" if args.extra else ""))
    record("CIFAR-10-JPEG time to accuracy", lines, save=not args.no_record)


def seed_summaries(results: list[dict]) -> list[str]:
    """Per recipe run over several seeds: mean and range of the final accuracy and of each time to target
    (a target some seed missed is reported as missed by that many seeds)."""
    lines = []
    for name in dict.fromkeys(r["name"] for r in results):
        runs = [r for r in results if r["name"] == name]
        if len(runs) < 2:
            continue
        finals = [r["summary"]["test_top1"] for r in runs]
        parts = [f"final {statistics.mean(finals):.2f}% (min {min(finals):.2f}, max {max(finals):.2f})"]
        for t in TARGETS:
            times = [r["reached"][t] for r in runs if r["reached"][t] is not None]
            missed = len(runs) - len(times)
            text = (f"{t:.0f}% in {statistics.mean(times) / 60:.1f} min (min {min(times) / 60:.1f}, "
                    f"max {max(times) / 60:.1f})" if times else f"{t:.0f}% never reached")
            parts.append(text + (f", missed by {missed} of {len(runs)} seeds" if times and missed else ""))
        lines += [f"{name} over {len(runs)} seeds: " + "; ".join(parts), ""]
    return lines


if __name__ == "__main__":
    main()
