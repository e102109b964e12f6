"""Distillation on CIFAR-10-JPEG: a ResNet-20 student taught by the ResNet-56 reference weights vs the same student alone.

Both runs use the same recipe and the same number of optimizer steps (``--epochs``, default 4: one-cycle
SGD, batch 128, bf16 autocast, channels_last); the taught run adds Hinton et al.'s soft-target loss
(``--kd-alpha``, ``--kd-temperature``) against the ResNet-56 checkpoint from ../shared/reference-weights
(a foreign weight file, loaded with weights_only=True, with its own ImageNet-style normalisation). The
teacher itself is evaluated on the same test split first. Wall times are reported too: the teacher's
forward passes make each step dearer, so "same budget" here means the same steps, not the same seconds.

    python benchmarks/distill.py [--epochs 4] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, convforge_json, extracted, record  # noqa: E402

REFERENCE_MEAN = ["0.485", "0.456", "0.406"]
REFERENCE_STD = ["0.229", "0.224", "0.225"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--kd-alpha", default="0.7")
    parser.add_argument("--kd-temperature", default="4")
    parser.add_argument("--teacher-checkpoint",
                        help="teach with this convforge checkpoint instead of the raw reference weights, e.g. the "
                             "reference ResNet-56 adapted to JPEG by `benchmarks/compress.py --stage control` "
                             "(/tmp/convforge-compress-bench/resnet56-unpruned-ft2.safetensors)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each runs both students (default: 0)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    data = extracted("cifar10-jpeg.tar.gz", "cifar10-jpeg")
    teacher = next((SHARED / "reference-weights").glob("resnet56-*.th"))
    spec = f"imagefolder:{data}"

    if args.teacher_checkpoint:
        teacher_eval, _ = convforge_json("eval", args.teacher_checkpoint, "--data", spec)
        teacher_args = ["--teacher", args.teacher_checkpoint]
    else:
        teacher_eval, _ = convforge_json("eval", "--model", "resnet56", "--weights", str(teacher), "--data", spec,
                                         "--num-classes", "10", "--mean", *REFERENCE_MEAN, "--std", *REFERENCE_STD)
        teacher_args = ["--teacher-model", "resnet56", "--teacher-weights", str(teacher),
                        "--teacher-mean", *REFERENCE_MEAN, "--teacher-std", *REFERENCE_STD]
    recipe = ["train", "--model", "resnet20", "--data", spec, "--epochs", str(args.epochs), "--batch-size", "128",
              "--lr", "0.2", "--amp", "--channels-last", "--threads", "2"]
    stamp = int(time.time())
    rows, gains = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        alone, alone_wall = convforge_json(*recipe, "--seed", str(seed),
                                           "--out", f"/tmp/convforge-bench-runs/distill-alone-{stamp}-{seed}")
        taught, taught_wall = convforge_json(
            *recipe, "--seed", str(seed), "--out", f"/tmp/convforge-bench-runs/distill-taught-{stamp}-{seed}",
            *teacher_args, "--kd-alpha", args.kd_alpha, "--kd-temperature", args.kd_temperature)
        gain = taught["test_top1"] - alone["test_top1"]
        gains.append(gain)
        rows.append(f"| {seed} | {alone['test_top1']:.2f}% ({alone_wall:.0f} s) | {taught['test_top1']:.2f}% "
                    f"({taught_wall:.0f} s) | {gain:+.2f} |")
    mean = sum(gains) / len(gains)
    lines = [
        f"Teacher: resnet56 {'checkpoint ' + args.teacher_checkpoint if args.teacher_checkpoint else 'reference weights'}"
        f", {teacher_eval['top1']:.2f}% on this test split. Student: resnet20, "
        f"kd-alpha {args.kd_alpha}, temperature {args.kd_temperature}.",
        "",
        "| seed | resnet20 alone: test top-1 (wall) | resnet20 taught: test top-1 (wall) | gain (points) |",
        "|---:|---:|---:|---:|",
        *rows,
        "",
        f"Same recipe and steps per seed ({args.epochs} epochs of one-cycle SGD lr 0.2, batch 128, crop-flip, bf16, "
        f"channels_last): mean gain {mean:+.2f} points over {len(gains)} seed(s); taught beats alone in "
        f"{sum(g > 0 for g in gains)} of {len(gains)}.",
        "Data: CIFAR-10-JPEG (not comparable with published CIFAR-10 figures); the teacher was trained on the "
        "original CIFAR-10 and never saw JPEG artefacts.",
        f"Command: `python benchmarks/distill.py --epochs {args.epochs} --seeds {args.seeds}"
        + (f" --teacher-checkpoint {args.teacher_checkpoint}`" if args.teacher_checkpoint else "`"),
    ]
    record("Distillation: ResNet-56 reference teacher -> ResNet-20 student, CIFAR-10-JPEG", lines,
           save=not args.no_record)


if __name__ == "__main__":
    main()
