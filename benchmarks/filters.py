"""Filter inspection (convforge.inspect): the metrics of the four reference CIFAR ResNets over depth,
agreement with torchconvquality, and the speed targets.

1. reference: ResNet-20/32/44/56 of ../shared/reference-weights (trained on CIFAR-10 by
   akamaster/pytorch_resnet_cifar10): per-layer metrics, their means over thirds of the normalised
   depth, the largest difference to torchconvquality, and the distribution shift between the four
   (and a random-init ResNet-20);
2. speed: extraction plus all metrics over >= 10 million 3x3 filters (39 convolutions of 512 x 512
   channels, Gaussian weights with a third of the filters of every other layer zeroed so that the
   clean-entropy path runs); the divergence of two 1-million-filter sets; appending the 10 M filters
   to a FilterDB and summarising it in a fresh process (its peak memory shows the chunked read).

    python benchmarks/filters.py [--threads 2] [--repeats 3] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, record

from convforge.inspect import (
    FilterDB,
    distribution_shift,
    extract_filters,
    layer_metrics,
    shift_matrix,
)
from convforge.models import create_model, load_foreign_weights

REFERENCE = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th",
             "resnet44": "resnet44-014dd654.th", "resnet56": "resnet56-4bfd9763.th"}
KEYS = (("sparsity", "sparsity"), ("variance_entropy_clean_norm", "clean norm. entropy"),
        ("orthogonality", "orthogonality"))


def reference(lines: list[str], picture_dir: Path | None) -> None:
    import torchconvquality

    models, rows = {}, {}
    for name, file in REFERENCE.items():
        path = SHARED / "reference-weights" / file
        if not path.is_file():
            raise SystemExit(f"{path} not found: the benchmark needs ../shared/reference-weights")
        models[name] = load_foreign_weights(create_model(name), path)
        rows[name] = layer_metrics(models[name])
    lines += ["Means over thirds of the normalised depth (early: d < 1/3, middle, late: d >= 2/3) and the "
              "last 3x3 layer:", "",
              "| model | metric | early | middle | late | last layer | max diff. to torchconvquality |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, model_rows in rows.items():
        ref = torchconvquality.measure_quality(models[name])
        diff = max(abs(ref[r["name"]][k] - r[k]) for r in model_rows for k in ref[r["name"]] if k != "n")
        for key, label in KEYS:
            thirds = []
            for lo, hi in ((0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.01)):
                part = [r for r in model_rows if lo <= r["depth"] < hi]
                thirds.append(np.average([r[key] for r in part], weights=[r["n"] for r in part]))
            lines.append(f"| {name} | {label} | {thirds[0]:.3f} | {thirds[1]:.3f} | {thirds[2]:.3f} | "
                         f"{model_rows[-1][key]:.3f} | {diff:.1e} |")
    torch.manual_seed(0)
    groups = {name: extract_filters(m).filters for name, m in models.items()}
    groups["resnet20 random init"] = extract_filters(create_model("resnet20")).filters
    names, matrix = shift_matrix(groups)
    lines += ["", "Distribution shift (CNN Filter DB divergence) between them:", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {n} | " + " | ".join(f"{v:.4f}" for v in row) + " |" for n, row in zip(names, matrix)]
    flagged = {name: [(r["name"], r["flags"]) for r in model_rows if r["flags"]] for name, model_rows in rows.items()}
    lines += ["", f"Flagged layers: {json.dumps(flagged)}"]
    if picture_dir is not None:
        from convforge.inspect.pictures import metrics_vs_depth

        metrics_vs_depth(rows, picture_dir / "reference_resnets_metrics_vs_depth.png")


def big_model(layers: int = 39, channels: int = 512) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    for i in range(layers):
        conv = nn.Conv2d(channels, channels, 3, bias=False, device="meta")
        weight = torch.randn(channels, channels, 3, 3)
        if i % 2:
            weight.view(-1, 9)[::3] = 0  # a third of this layer's filters sparse
        conv.weight = nn.Parameter(weight, requires_grad=False)
        model.append(conv)
    return model


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def speed(lines: list[str], repeats: int) -> None:
    model = big_model()
    n_filters = sum(m.weight.shape[0] * m.weight.shape[1] for m in model)
    layer_metrics(nn.Sequential(nn.Conv2d(4, 4, 3)))  # load the lazy linear-algebra kernels once
    times, _ = timed(lambda: (extract_filters(model), layer_metrics(model)), repeats)
    ext, _ = timed(lambda: extract_filters(model), 1)
    lines += ["| task | runs (s) | median (s) | target (s) |", "|---|---|---:|---:|",
              f"| extraction + all metrics, {n_filters:,} 3x3 filters in 39 layers | "
              f"{', '.join(f'{t:.2f}' for t in times)} | **{statistics.median(times):.2f}** | < 20 |"]
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1_000_000, 9, generator=g)
    b = torch.randn(1_000_000, 9, generator=g) * torch.linspace(0.5, 1.5, 9)
    times, value = timed(lambda: distribution_shift(a, b), repeats)
    lines.append(f"| divergence of two 1,000,000-filter sets (D = {value:.4f}) | "
                 f"{', '.join(f'{t:.2f}' for t in times)} | **{statistics.median(times):.2f}** | < 10 |")
    filters = extract_filters(model)
    small = extract_filters(nn.Sequential(nn.Conv2d(64, 64, 3)))
    with tempfile.TemporaryDirectory() as tmp:
        path, small_path = Path(tmp) / "db.h5", Path(tmp) / "small.h5"
        t = time.perf_counter()
        with FilterDB(path, "a") as db:
            db.append(filters, "big")
        append_s = time.perf_counter() - t
        with FilterDB(small_path, "a") as db:
            db.append(small, "small")
        size = path.stat().st_size
        del filters
        # peak resident memory of this process image (VmHWM; ru_maxrss would include the parent's before
        # exec), after summarising a 4,096-filter database (libraries loaded) and then the 10 M one
        code = ("import json, sys, time; from convforge.inspect import FilterDB\n"
                "def peak(): return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024\n"
                "FilterDB(sys.argv[2]).summary(); before = peak(); t = time.perf_counter()\n"
                "s = FilterDB(sys.argv[1]).summary()\n"
                "print(json.dumps({'s': time.perf_counter() - t, 'before': before, 'after': peak(), 'n': s['n_filters']}))")
        summary = json.loads(subprocess.run([sys.executable, "-c", code, str(path), str(small_path)],
                                            capture_output=True, text=True, check=True).stdout)
    lines.append(f"| FilterDB append of the {n_filters:,} filters (file {size / 2**20:.0f} MiB) | {append_s:.2f} | "
                 f"{append_s:.2f} | - |")
    lines.append(f"| FilterDB `--summary` in a fresh process, chunks of 262,144 filters | {summary['s']:.2f} | "
                 f"{summary['s']:.2f} | - |")
    lines += ["", f"Extraction alone: {ext[0]:.2f} s. The summary process's peak resident memory grew by "
              f"{summary['after'] - summary['before']:.0f} MiB (from {summary['before']:.0f} MiB after summarising a "
              f"4,096-filter database) to read the {n_filters:,}-filter one, whose filter array is "
              f"{n_filters * 36 / 2**20:.0f} MiB."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pictures", help="also draw the reference ResNets' metric curves into this folder")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines: list[str] = []
    reference(lines, Path(args.pictures) if args.pictures else None)
    record("Filter metrics of the reference CIFAR ResNets", lines, save=not args.no_record)
    lines = []
    speed(lines, args.repeats)
    lines.append("\nCommand: `python benchmarks/filters.py`")
    record("Filter inspection speed", lines, save=not args.no_record)


if __name__ == "__main__":
    main()
