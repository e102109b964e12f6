"""Imagewoof-160 data path: the variable-size image store against a conventional per-image pipeline.

Measured in one run on the same machine (issue 17, "data path speed"):
- building the store of the train split (9,025 real photos of varied aspect ratio, shorter side <= --store-size):
  wall time, bytes on disk, peak RSS of this process and of its decoding workers;
- training batches per second at 128 and 224 px: convforge's StoreLoader (batch RandomResizedCrop + flip +
  normalise from the memory-mapped store, prefetch threads) against the conventional pipeline (PIL decode of each
  JPEG, RandomResizedCrop and flip per image, to tensor, normalise; torch DataLoader with 2 worker processes);
  both draw the crop boxes with the same algorithm (convforge.data.views.random_resized_crop_params).

With ``--train-model NAME`` (e.g. resnet18), also end-to-end training images/s of that model (forward,
backward and SGD step, channels_last, optionally bf16 autocast) fed by each pipeline, in the same run.

    python benchmarks/photos_datapath.py [--images 2048] [--batch-size 64] [--store-size 160]
                                         [--train-model resnet18 [--train-steps 20] [--bf16]] [--no-record]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import extracted, record  # noqa: E402

from convforge.allocator import keep_freed_blocks  # noqa: E402
from convforge.data.imagefolder import list_image_folder  # noqa: E402
from convforge.data.store import build_store  # noqa: E402
from convforge.data.store_loader import StoreLoader  # noqa: E402
from convforge.data.views import random_resized_crop_params  # noqa: E402
from convforge.models.registry import create_model  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ConventionalDataset(torch.utils.data.Dataset):
    """What a torchvision-style pipeline does per image: decode, RandomResizedCrop, flip, to tensor, normalise."""

    def __init__(self, files: list[tuple[str, int]], size: int) -> None:
        self.files, self.size = files, size
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        generator = torch.Generator().manual_seed(i)
        with Image.open(path) as img:
            img = img.convert("RGB")
            top, left, h, w = (int(v) for v in random_resized_crop_params(
                torch.tensor([[img.height, img.width]]), generator=generator)[0])
            img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if torch.rand((), generator=generator) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, label


def images_per_s(batches, limit: int) -> float:
    """Images per second over the first ``limit`` images of ``batches`` (after one warm-up batch)."""
    seen, start = 0, None
    for x, _ in batches:
        if start is None:
            start = time.perf_counter()
            continue
        seen += x.shape[0]
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def training_images_per_s(model_name: str, batches, steps: int, bf16: bool, num_classes: int) -> float:
    """Training images/s of ``model_name`` (fresh, seeded) over ``steps`` SGD steps fed by ``batches``
    (channels_last, bf16 autocast if asked), timed after two warm-up steps."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seen, start = 0, None
    for step, (x, y) in enumerate(batches):
        if step == 2:
            start = time.perf_counter()
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), torch.as_tensor(y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if start is not None:
            seen += x.shape[0]
        if step >= steps + 1:
            break
    return seen / (time.perf_counter() - start)


def end_to_end(args: argparse.Namespace, store, files: list[tuple[str, int]], classes: int) -> list[str]:
    """The end-to-end rows: one model trained at 128 px on each pipeline."""
    size = 128
    ours = StoreLoader(store, args.batch_size, MEAN, STD, train=True, image_size=(size, size), seed=0, prefetch=2)
    conventional = torch.utils.data.DataLoader(ConventionalDataset(files, size), batch_size=args.batch_size,
                                               shuffle=True, num_workers=2, drop_last=True,
                                               generator=torch.Generator().manual_seed(0))
    rates = [training_images_per_s(args.train_model, pipeline, args.train_steps, args.bf16, classes)
             for pipeline in (ours.iter_from(0), conventional)]
    line = (f"| {args.train_model} {size} px{' bf16' if args.bf16 else ''} | {rates[0]:.1f} | {rates[1]:.1f} | "
            f"{rates[0] / rates[1]:.2f}x |")
    print(line, flush=True)
    return ["", f"End-to-end training (batch {args.batch_size}, forward + backward + SGD, channels_last"
                f"{', bf16 autocast' if args.bf16 else ''}, {args.train_steps} steps timed after 2 warm-up steps):",
            "", "| model | store + StoreLoader (img/s) | PIL + DataLoader, 2 workers (img/s) | store / PIL |",
            "|---|---:|---:|---:|", line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048, help="images timed per pipeline and size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--store-size", type=int, default=160)
    parser.add_argument("--store-images", type=int, default=0, help="train images in the store (0: all)")
    parser.add_argument("--train-model", help="also time end-to-end training of this model on each pipeline")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--bf16", action="store_true", help="end-to-end training under bf16 autocast")
    parser.add_argument("--folder", type=Path, help="an image folder with train/<class>/ to time instead of "
                                                    "Imagewoof-160 (e.g. larger photos, see --name)")
    parser.add_argument("--name", default="Imagewoof-160", help="the data's name in RESULTS.md")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    keep_freed_blocks()  # as `convforge train` does; the DataLoader workers fork from here and inherit it
    root = args.folder or extracted("imagewoof2-160.tar.gz", "imagewoof2-160")
    listing = list_image_folder(root)
    files = [(str(path), label) for path, label in listing.files["train"]]
    if args.store_images:  # a seeded sample of every class, for smoke runs
        keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:args.store_images]
        files = [files[i] for i in sorted(keep.tolist())]

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = build_store(files, listing.classes, Path(tmp) / "train", store_size=args.store_size, workers=2)
        build_s = time.perf_counter() - start
        store_bytes = sum(p.stat().st_size for p in store.path.iterdir())
        own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        worker_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        rows = []
        for size in (128, 224):
            ours = {prefetch: images_per_s(StoreLoader(store, args.batch_size, MEAN, STD, train=True,
                                                       image_size=(size, size), seed=0,
                                                       prefetch=prefetch).iter_from(0), args.images)
                    for prefetch in (0, 2)}
            conventional = torch.utils.data.DataLoader(ConventionalDataset(files, size), batch_size=args.batch_size,
                                                       shuffle=True, num_workers=2, drop_last=True,
                                                       generator=torch.Generator().manual_seed(0))
            theirs = images_per_s(conventional, args.images)
            best = max(ours.values())
            rows.append(f"| {size} px | {ours[0]:.0f} | {ours[2]:.0f} | {theirs:.0f} | {best / theirs:.2f}x |")
            print(rows[-1], flush=True)
        trained = end_to_end(args, store, files, len(listing.classes)) if args.train_model else []

    record(f"{args.name} data path: image store vs per-image pipeline", [
        f"Store of the train split ({len(files):,} photos, shorter side <= {args.store_size} px, never upscaled): "
        f"built in {build_s:.1f} s ({1e5 * build_s / len(files) / 60:.1f} min per 100k images) with 2 decoding "
        f"processes; {store_bytes / 1e6:.0f} MB on disk; peak RSS {own_rss:.0f} MB (this process), "
        f"{worker_rss:.0f} MB (largest worker).",
        "",
        f"Training batches (batch {args.batch_size}, RandomResizedCrop scale 0.08-1 + flip + normalise, "
        f"{args.images} images timed after one warm-up batch, 2 threads):",
        "",
        "| crop | image store + StoreLoader, no prefetch thread (img/s) | the same, 2 prefetch threads (img/s) | "
        "PIL per image + DataLoader, 2 worker processes (img/s) | best store / PIL |",
        "|---|---:|---:|---:|---:|",
        *rows,
        *trained,
        "",
        f"Command: `python benchmarks/photos_datapath.py --images {args.images} --batch-size {args.batch_size} "
        f"--store-size {args.store_size}"
        + (f" --train-model {args.train_model} --train-steps {args.train_steps}" if args.train_model else "")
        + (" --bf16" if args.bf16 else "") + (f" --store-images {args.store_images}" if args.store_images else "")
        + (f" --folder {args.folder} --name '{args.name}'" if args.folder else "") + "`.",
    ], save=not args.no_record)


if __name__ == "__main__":
    main()
