"""Data-parallel scaling: the same training run on 1 process and on N processes (torchrun, gloo on CPU).

The global batch is the same in every row (N processes x batch/N), so the runs take the same steps.
On this 2-core machine 1 process x 2 threads and 2 processes x 1 thread share the same cores: the
figure to expect is "about the same", and what it measures is the cost of DDP's communication.

    python benchmarks/ddp_scaling.py [--data SPEC] [--model resnet20] [--epochs 1] [--procs 1,2] [--no-save]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import extracted, record


def run(procs: int, args: argparse.Namespace, data: str, out: Path) -> dict:
    per_process = args.batch_size // procs
    cores = os.cpu_count() or 1
    command = [sys.executable, "-m", "convforge", "train", "--model", args.model, "--data", data,
               "--epochs", str(args.epochs), "--batch-size", str(per_process), "--label-smoothing", "0.1",
               "--channels-last", "--json", "--out", str(out)]
    if args.amp:
        command.append("--amp")
    if procs > 1:
        command += ["--nproc-per-node", str(procs), "--sync-bn"]
    else:
        command += ["--threads", str(cores)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // procs)))
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{procs}-process run failed:\n{result.stderr[-3000:]}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    summary["wall_s"] = wall
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="data spec (default: CIFAR-10-JPEG from ../shared)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    data = args.data or f"imagefolder:{extracted('cifar10-jpeg.tar.gz', 'cifar10-jpeg')}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # warm the decode cache so that no row pays for decoding
        run(1, argparse.Namespace(**{**vars(args), "epochs": 1, "model": "smallcnn"}), data, Path(tmp) / "warm")
        for procs in (int(p) for p in args.procs.split(",")):
            summary = run(procs, args, data, Path(tmp) / f"p{procs}")
            rows.append((procs, summary))
            print(f"{procs} process(es): {summary['images_per_s']:.0f} img/s, wall {summary['wall_s']:.1f} s, "
                  f"test top-1 {summary['test_top1']:.2f}%", flush=True)
    base = rows[0][1]["images_per_s"]
    lines = ["| processes x threads | train images/s | speed-up | wall time (s) | test top-1 after the run (%) |",
             "|---|---:|---:|---:|---:|"]
    cores = os.cpu_count() or 1
    for procs, summary in rows:
        lines.append(f"| {procs} x {max(1, cores // procs)} | {summary['images_per_s']:.0f} | "
                     f"{summary['images_per_s'] / base:.2f}x | {summary['wall_s']:.1f} | {summary['test_top1']:.2f} |")
    lines += ["", f"{args.model}, global batch {args.batch_size}, {args.epochs} epoch(s), channels_last"
              f"{', bf16' if args.amp else ''}, SyncBN when N > 1; data: {data.split(':')[0]} "
              f"({'CIFAR-10-JPEG' if not args.data else args.data}).",
              f"Command: `python benchmarks/ddp_scaling.py{' --amp' if args.amp else ''} --epochs {args.epochs}`"]
    record("Data-parallel scaling, 1 vs N processes on one machine", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
