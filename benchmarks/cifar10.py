"""ResNet-20 on CIFAR-10-JPEG: convforge's training pipeline against the conventional one, in one run.

Conventional: a torch Dataset decoding each JPEG with PIL, per-sample random crop (padding 4) and
flip in Python, torch.utils.data.DataLoader with 2 workers, the model in eager mode (NCHW).
convforge: the decoded uint8 cache, whole-batch tensor augmentation, channels_last.
Both train the same model with the same optimizer and batch size; throughput counts every image
that went through a training step, data loading and augmentation included.
Then convforge trains for a fixed budget of epochs and reports test top-1.

    python benchmarks/cifar10.py [--steps 60] [--budget-epochs 4] [--no-record]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import extracted, record  # noqa: E402

import convforge  # noqa: E402
from convforge.data import BatchLoader, load  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class JpegFolder(torch.utils.data.Dataset):
    """What a user would write: list files, decode with PIL per item, augment per sample."""

    def __init__(self, root: Path) -> None:
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.items = [(str(f), i) for i, c in enumerate(self.classes) for f in sorted((root / c).iterdir())]
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
        padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
        top, left = random.randint(0, 8), random.randint(0, 8)
        img = padded[top:top + 32, left:left + 32]
        if random.random() < 0.5:
            img = img[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, label


def train_steps(model, optimizer, batches, steps: int, warmup: int, amp: bool = False) -> float:
    """Images per second over ``steps`` training steps after ``warmup`` steps."""
    model.train()
    seen, start = 0, None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if start is not None:
            seen += y.shape[0]
        if i + 1 == warmup + steps:
            break
    return seen / (time.perf_counter() - start)


def fresh_model(channels_last: bool):
    torch.manual_seed(0)
    model = convforge.create_model("resnet20", num_classes=10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--budget-epochs", type=int, default=4)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    root = extracted("cifar10-jpeg.tar.gz", "cifar10-jpeg")

    t = time.perf_counter()
    data = load(f"imagefolder:{root}", log=print)
    load_s = time.perf_counter() - t
    print(f"convforge data load (cache {'hit' if load_s < 5 else 'miss'}): {load_s:.1f} s")

    model, opt = fresh_model(channels_last=False)
    dataset = JpegFolder(root / "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=2,
                                         drop_last=True, persistent_workers=False)
    conventional = train_steps(model, opt, loader, args.steps, args.warmup)
    print(f"conventional (PIL + DataLoader, 2 workers, eager NCHW): {conventional:.0f} img/s")

    results = {}
    for channels_last, amp in ((False, False), (True, False), (True, True)):
        model, opt = fresh_model(channels_last)
        batches = BatchLoader(data.train, args.batch_size, MEAN, STD, shuffle=True, augment="crop-flip",
                              crop_padding=4, drop_last=True, channels_last=channels_last)
        results[channels_last, amp] = train_steps(model, opt, batches, args.steps, args.warmup, amp)
        print(f"convforge (cache + batch augmentation{', channels_last' if channels_last else ''}"
              f"{', bf16 autocast' if amp else ''}): {results[channels_last, amp]:.0f} img/s")
    best_layout, best_amp = max(results, key=results.get)

    summary = convforge.fit(convforge.TrainConfig(
        model="resnet20", data=f"imagefolder:{root}", epochs=args.budget_epochs, batch_size=args.batch_size,
        lr=0.2, label_smoothing=0.1, channels_last=best_layout, amp=best_amp, out=f"/tmp/convforge-bench-runs/cifar10-{int(time.time())}",
    ))
    lines = [
        "| pipeline | images/s (train step incl. data) |",
        "|---|---:|",
        f"| conventional: PIL decode per image, per-sample crop+flip, DataLoader 2 workers, eager NCHW | {conventional:.0f} |",
        f"| convforge: uint8 cache, batch augmentation, NCHW, fp32 | {results[False, False]:.0f} ({results[False, False] / conventional:.2f}x) |",
        f"| convforge: uint8 cache, batch augmentation, channels_last, fp32 | {results[True, False]:.0f} ({results[True, False] / conventional:.2f}x) |",
        f"| convforge: uint8 cache, batch augmentation, channels_last, bf16 autocast (`--amp`) | {results[True, True]:.0f} ({results[True, True] / conventional:.2f}x) |",
        "",
        f"ResNet-20, batch {args.batch_size}, {args.steps} steps after {args.warmup} warm-up steps, same optimizer. "
        f"fp32 speed-up from the data path and memory format alone: **{results[True, False] / conventional:.2f}x**; "
        f"with bf16 autocast: **{results[True, True] / conventional:.2f}x**.",
        f"Data load of the 60,000-image cache: {load_s:.1f} s.",
        f"Fixed budget: {args.budget_epochs} epochs of ResNet-20 (one-cycle SGD lr 0.2, label smoothing 0.1, batch "
        f"{args.batch_size}, channels_last={best_layout}, bf16={best_amp}) -> CIFAR-10-JPEG test top-1 **{summary['test_top1']:.2f}%** in {summary['wall_time_s']:.0f} s "
        f"wall ({summary['images_per_s']:.0f} img/s).",
        "Command: `python benchmarks/cifar10.py" + (f" --budget-epochs {args.budget_epochs}" if args.budget_epochs != 4 else "") + "`",
    ]
    record("CIFAR-10-JPEG, ResNet-20 training throughput", lines, save=not args.no_record)


if __name__ == "__main__":
    main()
