"""CamVid-240 semantic segmentation from scratch in a stated CPU budget: LinkNet (ResNet-18 encoder) and
DeepLabv3 (ASPP on a dilated ResNet-18, output stride 16); mIoU, pixel accuracy, per-class IoU, images/s.

Data. CamVid-240 is the 11-class SegNet version of CamVid halved to 240x180 (see ../shared/datasets/README.md):
train 367, val 101, test 233 images; mask 11 (void) is ignored; mIoU is over the 11 classes. The models
train on the 367 train images only: the engine evaluates val and test after every epoch and keeps the
checkpoint of the best *val* mIoU (val selects, so it is not trained on, although many papers train on
train + val = 468). The figures reported are that epoch's val and test figures; test never selects.

No pretrained weights: none are available offline, so both encoders start from random initialisation.
Published CamVid results (SegNet, LinkNet, DeepLab and later) use ImageNet-pretrained encoders, 480x360 or
960x720 images, train + val and hours of GPU training, so the figures here are NOT comparable with them.

Training: a fresh `convforge train --task segment` process per model on the CPU (`--threads`), AdamW (lr
1e-3, weight decay 0.05), batch 8, one-cycle, cross-entropy with the void label ignored, joint augmentation
`scale-crop-flip`: random scale in [0.75, 1.5], a random 176x240 crop (both multiples of 16, the output stride;
the part of a crop outside a down-scaled image is void) and a horizontal flip. The budget (`--minutes`, per
model) is for the training steps only; the evaluations after each epoch are extra and reported.

Epochs and number format. Before each run the script measures training images/s of that model in this process
(same loader, augmentation, loss, optimizer, batch and threads) for `--probe-seconds` in each of fp32, bfloat16
autocast (`--amp`), channels_last and both, and prints the four rates. `--format auto` (the default) trains with
the fastest, but keeps fp32 unless another format is at least 10% faster; `--format NAME` forces one. The run
has as many whole epochs as fit the budget at the measured rate (at least 1).

First checks while writing this script (2-core AMD EPYC with AVX512-BF16, niced): in a quiet moment, one step
of batch 8 per format gave LinkNet 10.9 (fp32), 22.4 (amp), 13.0 (channels_last) and 22.5 (both) training
images/s and DeepLabv3 6.4, 9.1, 6.2 and 13.4: bfloat16 autocast helps both (about 2x, with channels_last for
DeepLab), channels_last alone does not; inference at batch 16 rose likewise (LinkNet 31 -> 79, DeepLabv3
23 -> 55 images/s with both). One step is a rough figure; 20 s per format while another timed run held the CPU
gave figures that swung 5x between runs (LinkNet fp32 1.0, amp 5.5; DeepLabv3 fp32 1.1, amp 1.1) and are not
evidence. The probe settles it per model on the quiet machine and the output says which format was used.

Inference: the selected (best-val) checkpoint loaded with `convforge.train.load_checkpoint`, eval mode,
`torch.inference_mode`, 240x180 inputs, `--threads` threads, after warm-up: images/s at batch 1 (median of
`--infer-runs` runs) and batch 16 (median of `--infer-runs-16` runs), fp32, and also in the training format
when that is not fp32.

    python benchmarks/camvid.py [--root DIR] [--minutes 8] [--models linknet_resnet18,deeplabv3_resnet18]
                                [--format auto] [--threads 2] [--no-record] [--smoke]

`--smoke` runs everything on 8 train, 4 val and 4 test images (symlinked into a temporary folder): one-step
probes, 1 epoch, one timed inference run, never recorded. With `--format auto` it probes all four formats.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import convforge_json, extracted, read_records, record

MODELS = {"linknet_resnet18": {}, "deeplabv3_resnet18": {"output_stride": 16}}
FORMATS = {"fp32": (False, False), "amp": (True, False), "channels-last": (False, True),
           "amp+channels-last": (True, True)}  # name: (bfloat16 autocast, channels_last)
PREFER_FP32 = 1.10  # --format auto leaves fp32 only for a format at least 10% faster
BATCH = 8
LR = 1e-3
WEIGHT_DECAY = 0.05
SCALES = (0.75, 1.5)
CROP = (176, 240)  # (H, W)
IMAGE = (180, 240)  # (H, W) of CamVid-240
RUNS = Path("/tmp/convforge-bench-runs")


def smoke_root(source: Path) -> Path:
    """A small copy of ``source`` made of symlinks: 8 train, 4 val and 4 test image/mask pairs."""
    target = RUNS / f"camvid-smoke-{int(time.time())}"
    target.mkdir(parents=True)
    (target / "classes.txt").symlink_to((source / "classes.txt").resolve())
    for split, count in (("train", 8), ("val", 4), ("test", 4)):
        for kind in ("images", "masks"):
            (target / split / kind).mkdir(parents=True)
        for path in sorted((source / split / "images").glob("*.png"))[:count]:
            for kind in ("images", "masks"):
                (target / split / kind / path.name).symlink_to((source / split / kind / path.name).resolve())
    return target


def probe(name: str, data, fmt: str, seconds: float, threads: int, lr: float, warmup: int = 2) -> float:
    """Training images/s of ``name`` in format ``fmt``, measured here after ``warmup`` steps."""
    from convforge.data.joint_augment import SegmentationLoader
    from convforge.models import create_model
    from convforge.train.losses import segmentation_loss

    amp, channels_last = FORMATS[fmt]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name, num_classes=data.num_classes, in_chans=data.channels, **MODELS[name]).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    loader = SegmentationLoader(data.train, BATCH, data.mean, data.std, shuffle=True, augment="scale-crop-flip",
                                scales=SCALES, crop=CROP, ignore_index=data.ignore_index, drop_last=True,
                                channels_last=channels_last)
    seen, start, step, epoch = 0, None, 0, 0
    while True:
        loader.set_epoch(epoch)
        for x, y in loader:
            if step == warmup:
                start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = segmentation_loss(model(x).float(), y, data.ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if start is not None:
                seen += y.shape[0]
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    return seen / elapsed
        epoch += 1


def train(name: str, root: Path, epochs: int, fmt: str, lr: float, threads: int, tag: str) -> dict:
    out = RUNS / f"camvid-{name}-{tag}"
    amp, channels_last = FORMATS[fmt]
    command = ["train", "--task", "segment", "--data", f"segfolder:{root}",
               "--model", name, *[a for k, v in MODELS[name].items() for a in ("--model-arg", f"{k}={v}")],
               "--epochs", str(epochs), "--batch-size", str(BATCH), "--optimizer", "adamw", "--lr", f"{lr:g}",
               "--weight-decay", f"{WEIGHT_DECAY:g}", "--augment", "scale-crop-flip",
               "--seg-scales", *map(str, SCALES), "--seg-crop", *map(str, CROP),
               *(["--amp"] if amp else []), *(["--channels-last"] if channels_last else []),
               "--threads", str(threads), "--device", "cpu", "--out", str(out)]
    summary, wall = convforge_json(*command)
    records = read_records(out)
    best = next(r for r in records if r["epoch"] == summary["best_epoch"])
    return {"name": name, "summary": summary, "records": records, "best": best, "final": records[-1],
            "wall": wall, "out": out, "format": fmt}


def inference_rates(run_dir: Path, fmt: str, threads: int, runs: int, runs_16: int, warmup: int = 2) -> dict:
    """Images/s of the run's selected checkpoint at batch 1 and 16 (240x180), median time of the runs."""
    from convforge.measure.bench import time_fn
    from convforge.train import load_checkpoint

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(run_dir)
    model = ckpt.model.float().eval()
    amp, channels_last = FORMATS[fmt]
    if channels_last:
        model.to(memory_format=torch.channels_last)
    rates = {}
    for batch, count in ((1, runs), (16, runs_16)):
        x = torch.randn(batch, 3, *IMAGE)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def forward(x=x):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                return model(x)

        shape = tuple(forward().shape)  # the first warm-up run
        if shape != (batch, len(ckpt.classes), *IMAGE):
            raise SystemExit(f"{run_dir}: unexpected output shape {shape}")
        rates[batch] = batch / statistics.median(time_fn(forward, warmup=warmup - 1, repeats=count))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="the camvid/ folder (default: extract the shared archive)")
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget per model, minutes (default: 8)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                        help="number format / memory layout for training (default: auto, the fastest measured)")
    parser.add_argument("--lr", type=float, default=LR, help=f"AdamW learning rate (default: {LR:g})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe-seconds", type=float, default=10.0, help="seconds of training measured per format")
    parser.add_argument("--infer-runs", type=int, default=20, help="timed batch-1 inference runs (median)")
    parser.add_argument("--infer-runs-16", type=int, default=5, help="timed batch-16 inference runs (median)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a few images, 1 epoch per model, never recorded")
    args = parser.parse_args()
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}: this benchmark runs {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    source = Path(args.root) if args.root else extracted("camvid-half.tar.gz", "camvid")
    root = smoke_root(source) if args.smoke else source
    budget = args.minutes * 60.0
    tag = f"{'smoke-' if args.smoke else ''}{int(time.time())}"
    probe_s = 0.0 if args.smoke else args.probe_seconds

    from convforge.data import load
    from convforge.measure import count_macs, count_params
    from convforge.models import create_model

    data = load(f"segfolder:{root}", log=print)
    print(f"{len(data.train)} train, {len(data.val)} val, {len(data.test)} test images; classes: "
          + ", ".join(data.classes), flush=True)

    results = []
    for name in args.models.split(","):
        formats = list(FORMATS) if args.format == "auto" else [args.format]
        rates = {}
        for fmt in formats:
            rates[fmt] = probe(name, data, fmt, probe_s, args.threads, args.lr, warmup=1 if args.smoke else 2)
            print(f"{name} [{fmt}]: {rates[fmt]:.2f} training images/s", flush=True)
        fmt = max(rates, key=rates.get)
        if "fp32" in rates and rates[fmt] < PREFER_FP32 * rates["fp32"]:
            fmt = "fp32"  # not clearly faster: keep full precision
        steps = len(data.train) // BATCH
        epoch_s = steps * BATCH / rates[fmt]
        epochs = 1 if args.smoke else max(1, math.floor(budget / epoch_s))
        print(f"{name}: training in {fmt}, {epoch_s:.0f} s per epoch of {steps} steps -> {epochs} epoch(s) in "
              f"{args.minutes:g} min", flush=True)
        result = train(name, root, epochs, fmt, args.lr, args.threads, tag)
        model = create_model(name, num_classes=data.num_classes, in_chans=data.channels, **MODELS[name])
        result.update(probe=rates, estimated_epoch_s=epoch_s, params=count_params(model),
                      macs=count_macs(model, (data.channels, *IMAGE)))
        runs, runs_16, warmup = (1, 1, 1) if args.smoke else (args.infer_runs, args.infer_runs_16, 2)
        result["infer"] = {"fp32": inference_rates(result["out"], "fp32", args.threads, runs, runs_16, warmup)}
        if fmt != "fp32":
            result["infer"][fmt] = inference_rates(result["out"], fmt, args.threads, runs, runs_16, warmup)
        results.append(result)

    lines = [("| model | params | MACs at 240x180 | format | epochs | train time | train img/s | best epoch | "
              "val mIoU | val pixel acc | test mIoU | test pixel acc | infer img/s, batch 1 / 16 (fp32) | "
              "infer img/s, batch 1 / 16 (training format) |"),
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s, b = r["summary"], r["best"]
        fp32, other = r["infer"]["fp32"], r["infer"].get(r["format"])
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e9:.2f} G | {r['format']} | "
                     f"{s['epochs']} | {s['train_time_s']:.0f} s | {s['images_per_s']:.1f} | {b['epoch']} | "
                     f"{b['val_miou']:.2f}% | {b['val_pixel_acc']:.2f}% | **{b['test_miou']:.2f}%** | "
                     f"{b['test_pixel_acc']:.2f}% | {fp32[1]:.1f} / {fp32[16]:.1f} | "
                     + (f"{other[1]:.1f} / {other[16]:.1f} |" if r["format"] != "fp32" else "(fp32) |"))
    lines += ["", "Test IoU per class (%), at the epoch selected on val:", "",
              "| class | " + " | ".join(r["name"] for r in results) + " |",
              "|---|" + "---:|" * len(results)]
    for c, cls in enumerate(data.classes):
        cells = [r["best"]["test_per_class_iou"][c] for r in results]
        lines.append(f"| {cls} | " + " | ".join("n/a" if v is None else f"{v:.1f}" for v in cells) + " |")
    lines.append("")
    for r in results:
        s, f = r["summary"], r["final"]
        eval_s = sum(x.get("eval_time_s", 0.0) for x in r["records"])
        lines.append(f"{r['name']}: training rate measured before the run (images/s): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in r["probe"].items())
                     + f" -> {r['format']}, {r['estimated_epoch_s']:.0f} s per epoch estimated; "
                     f"last epoch: val mIoU {f['val_miou']:.2f}%, test mIoU {f['test_miou']:.2f}%; "
                     f"evaluations {eval_s:.0f} s, whole process {r['wall']:.0f} s; run dir {r['out']}.")
    lines += ["", (f"Budget: {args.minutes:g} min of training steps per model on the CPU ({args.threads} threads); "
                   f"evaluations extra. Trained on the {len(data.train)} train images only, checkpoint selected on "
                   f"val mIoU ({len(data.val)} images), test ({len(data.test)} images) reported at that epoch. "
                   f"AdamW lr {args.lr:g}, weight decay {WEIGHT_DECAY:g}, batch {BATCH}, one-cycle, scale-crop-flip "
                   f"(scales {SCALES[0]:g}-{SCALES[1]:g}, crop {CROP[0]}x{CROP[1]}), cross-entropy ignoring void."),
              ("No pretrained weights (none available offline): both encoders are trained from scratch. Published "
               "CamVid figures use ImageNet-pretrained encoders, full-resolution images and train + val, so they are "
               "not comparable; this is CamVid-240."),
              f"Command: `python benchmarks/camvid.py{''.join(' ' + a for a in sys.argv[1:])}`"]
    title = f"CamVid-240 segmentation from scratch in {args.minutes:g} CPU minutes per model"
    record(title + (" [smoke test]" if args.smoke else ""), lines, save=not (args.no_record or args.smoke))


if __name__ == "__main__":
    main()
