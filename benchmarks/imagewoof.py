"""Imagewoof-160 from random initialisation: val top-1 per epoch against wall time from process start.

One fresh `convforge train` process on the image-store path (`--store-size`, RandomResizedCrop + flip, evaluation
resize + centre crop); the store of each split is built in the first run and reused after (warm cache). The time
to X% is the wall time from process start to the end of the first evaluation at or above X% (per-epoch
``elapsed_s`` plus the measured start-up). Published anchor (fast.ai Imagenette/Imagewoof leaderboard, GPU,
random init, 128 px): 76.61% after 5 epochs, 86.27% after 20.

    python benchmarks/imagewoof.py [--epochs N] [--train "--recipe imagewoof-fast ..."] [--no-record]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import convforge_json, extracted, read_records, record  # noqa: E402

DEFAULT_TRAIN = "--recipe imagewoof-fast"
TARGETS = (60.0, 76.6, 80.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, help="default: the recipe's")
    parser.add_argument("--train", default=DEFAULT_TRAIN, help="`convforge train` options besides --data/--epochs")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    data = extracted("imagewoof2-160.tar.gz", "imagewoof2-160")
    out = Path(f"/tmp/convforge-bench-runs/imagewoof-{int(time.time())}")
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    summary, wall = convforge_json("train", "--data", f"imagefolder:{data}", *epochs, "--out", str(out),
                                   *shlex.split(args.train))
    startup = wall - summary["wall_time_s"]
    # Imagewoof has train/ and val/ only: convforge evaluates val/ as the test split (test_top1)
    records = read_records(out)
    curve = [(r["epoch"], startup + r["elapsed_s"], r["test_top1"], r["images_per_s"])
             for r in records if "test_top1" in r]
    reached = {t: next((s for _, s, a, _ in curve if a >= t), None) for t in TARGETS}
    crops = ", ".join(f"{r['epoch']}: {r['train_size'][0]}" for r in records if "train_size" in r)

    def seconds(value):
        return "not reached" if value is None else f"{value:.0f} s ({value / 60:.1f} min)"

    record("Imagewoof-160 from random init (image store, RandomResizedCrop)", [
        "| epoch | wall from process start | val top-1 (Imagewoof's val/, 3,929 images) | training images/s |",
        "|---:|---:|---:|---:|",
        *[f"| {e} | {s:.0f} s ({s / 60:.1f} min) | {a:.2f}% | {ips:.0f} |" for e, s, a, ips in curve],
        "",
        "Time to " + ", ".join(f"{t:g}%: {seconds(reached[t])}" for t in TARGETS)
        + f"; start-up (imports, store open or build, mean/std) {startup:.0f} s; {summary['params']:,} params, "
        f"{summary['macs'] / 1e6:.0f} M MACs per image at the training crop."
        + (f" Training crop per epoch (progressive resizing): {crops}." if crops else ""),
        f"Command: `python benchmarks/imagewoof.py{' --epochs ' + str(args.epochs) if args.epochs else ''} "
        f"--train \"{args.train}\"`.",
    ], save=not args.no_record)


if __name__ == "__main__":
    main()
