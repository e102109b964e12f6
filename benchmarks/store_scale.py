"""Image store build at scale: time, throughput, disk and peak memory from 10k to 100k images (issue 17, "Scale").

Imagewoof-160's train split (9,025 photos) is repeated through a farm of symbolic links in /tmp (one folder
per copy, so every copy has its own path and the store's key sees distinct files) up to ``--images``. The
store is built for each size of ``--sizes`` in a fresh child process (so that its peak RSS, and that of its
largest decoding worker, belong to that size alone) and deleted after measuring. The copies' JPEG bytes
come from the page cache after the first pass: disk reads are not part of the figures.

Then an ImageNet projection (1.28M images): naive (the measured bytes/image and images/s), and with a
decode-cost ratio measured here on larger JPEGs made from the same photos (shorter side 375 px, about
ImageNet's ~400x350 mean; ImageNet's ~110 KB JPEGs are larger than Imagewoof-160's).

    python benchmarks/store_scale.py [--images 100000] [--sizes 10000,25000,50000,100000] [--store-size 160]
                                     [--workers N] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import extracted, record  # noqa: E402

from convforge.data.imagefolder import list_image_folder  # noqa: E402
from convforge.data.store import build_store, decode_upright, stored_size  # noqa: E402

IMAGENET = 1_281_167  # ImageNet-1k train images
FARM = Path(tempfile.gettempdir()) / "convforge-store-scale"


def farm_files(files: list[tuple[str, int]], count: int) -> list[tuple[str, int]]:
    """``count`` (path, label) pairs: ``files`` repeated through symbolic links, one folder per copy."""
    out: list[tuple[str, int]] = []
    for copy in range((count + len(files) - 1) // len(files)):
        folder = FARM / "links" / f"copy{copy:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (path, label) in enumerate(files[:count - len(out)]):
            link = folder / f"{i:05d}{Path(path).suffix}"
            if not link.is_symlink():
                link.symlink_to(path)
            out.append((str(link), label))
    return out


def child(args: argparse.Namespace) -> None:
    """Build one store (in this fresh process) and print its figures as JSON on the last line."""
    files = json.loads(Path(args.child).read_text())
    out = FARM / f"store-{len(files)}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    store = build_store([tuple(f) for f in files], [str(c) for c in range(10)], out, store_size=args.store_size,
                        workers=args.workers, log=lambda m: print(m, file=sys.stderr, flush=True))
    build_s = time.perf_counter() - start
    disk = sum(p.stat().st_size for p in store.path.iterdir())
    result = {"images": len(store), "build_s": build_s, "disk_bytes": disk,
              "parent_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    del store
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result), flush=True)


def measure(files: list[tuple[str, int]], args: argparse.Namespace) -> dict:
    listing = FARM / f"files-{len(files)}.json"
    listing.write_text(json.dumps(files))
    command = [sys.executable, __file__, "--child", str(listing), "--store-size", str(args.store_size),
               "--workers", str(args.workers)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def decode_ratio(files: list[tuple[str, int]], store_size: int, count: int) -> tuple[float, float, float]:
    """(seconds per image on the originals, on ImageNet-sized re-encodings, mean KB of those) over ``count``."""
    large = FARM / "large"
    large.mkdir(parents=True, exist_ok=True)
    originals = [path for path, _ in files[:count]]
    made = []
    for i, path in enumerate(originals):
        target = large / f"{i:04d}.jpg"
        if not target.is_file():
            with Image.open(path) as img:
                scale = 375 / min(img.size)
                img.convert("RGB").resize((round(img.width * scale), round(img.height * scale)),
                                          Image.LANCZOS).save(target, quality=90)
        made.append(str(target))
    times = []
    for paths in (originals, made):
        start = time.perf_counter()
        for _ in range(3):
            for path in paths:
                with Image.open(path) as img:
                    size = stored_size(img, store_size)
                decode_upright(path, size, 3, store_size)
        times.append((time.perf_counter() - start) / (3 * len(paths)))
    return times[0], times[1], sum(os.path.getsize(p) for p in made) / len(made) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000, help="the largest store built")
    parser.add_argument("--sizes", default="10000,25000,50000,100000", help="store sizes built (<= --images)")
    parser.add_argument("--store-size", type=int, default=160)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--probe", type=int, default=64, help="JPEGs timed for the decode-cost ratio")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    root = extracted("imagewoof2-160.tar.gz", "imagewoof2-160")
    train = [(str(path), label) for path, label in list_image_folder(root).files["train"]]
    sizes = sorted({n for n in (int(s) for s in args.sizes.split(",")) if n <= args.images} | {args.images})
    if args.images < 10_000:  # a smoke run: a few proportional sizes
        sizes = sorted({max(1, args.images // 4), max(1, args.images // 2), args.images})
    files = farm_files(train, args.images)
    results = []
    for n in sizes:
        results.append(measure(files[:n], args))
        r = results[-1]
        print(f"{n} images: {r['build_s']:.1f} s, {r['disk_bytes'] / 1e9:.2f} GB, RSS {r['parent_rss_mb']:.0f} MB "
              f"(parent) / {r['worker_rss_mb']:.0f} MB (largest worker)", flush=True)
    small_s, large_s, large_kb = decode_ratio(train, args.store_size, min(args.probe, len(train)))
    record("Image store build at scale (Imagewoof-160 train repeated)", report(results, args, small_s, large_s,
                                                                               large_kb), save=not args.no_record)


def _worker(result: dict) -> str:
    return f"{result['worker_rss_mb']:.0f}" if result["worker_rss_mb"] else "none (decoded in the parent)"


def report(results: list[dict], args: argparse.Namespace, small_s: float, large_s: float, large_kb: float) -> list[str]:
    """The RESULTS.md lines: the table, linearity and the ImageNet projection."""
    rows = [f"| {r['images']:,} | {r['build_s']:.1f} | {r['images'] / r['build_s']:.0f} | "
            f"{1e4 * r['build_s'] / r['images']:.1f} | {r['disk_bytes'] / 1e9:.2f} | {r['parent_rss_mb']:.0f} | "
            f"{_worker(r)} |" for r in results]
    per_10k = [1e4 * r["build_s"] / r["images"] for r in results]
    last = results[-1]
    rate, per_image = last["images"] / last["build_s"], last["disk_bytes"] / last["images"]
    ratio = large_s / small_s
    naive_h, decode_h = IMAGENET / rate / 3600, IMAGENET / rate * ratio / 3600
    return [
        f"Store build (shorter side <= {args.store_size} px, {args.workers} decoding processes), each size in a "
        "fresh process, the copies' JPEGs read from the page cache:",
        "",
        "| images | build (s) | images/s | s per 10k images | on disk (GB) | peak RSS parent (MB) | "
        "peak RSS largest worker (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Linearity: {min(per_10k):.1f}-{max(per_10k):.1f} s per 10k images (largest / smallest "
        f"{max(per_10k) / min(per_10k):.2f}); peak RSS at most {max(r['parent_rss_mb'] for r in results):.0f} MB "
        f"(parent) and {max(r['worker_rss_mb'] for r in results):.0f} MB (worker).",
        "",
        f"ImageNet projection ({IMAGENET:,} train images): {per_image / 1e3:.0f} KB/image -> "
        f"{IMAGENET * per_image / 1e9:.0f} GB on disk; naively (Imagewoof-160's decode cost) "
        f"{naive_h:.1f} h at {rate:.0f} images/s. Decoding a JPEG re-encoded at shorter side 375 px "
        f"({large_kb:.0f} KB mean, quality 90) to the store takes {1e3 * large_s:.1f} ms vs {1e3 * small_s:.1f} ms "
        f"for Imagewoof-160's ({ratio:.2f}x, one process): with that ratio, {decode_h:.1f} h "
        f"({60 * decode_h * 1e5 / IMAGENET:.0f} min per 100k images).",
        "",
        f"Command: `python benchmarks/store_scale.py --images {args.images} --sizes {args.sizes} "
        f"--store-size {args.store_size} --workers {args.workers}`.",
    ]


if __name__ == "__main__":
    main()
