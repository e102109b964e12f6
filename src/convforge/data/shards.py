"""WebDataset tar shards (``wds:DIR``): photos read in a stream, for data that no single disk holds.

``wds:DIR`` names a folder holding ``train-*.tar`` and ``val-*.tar`` (and/or ``test-*.tar``) shards and
``classes.json`` (``{"classes": [...], "counts": {"train-000000.tar": N, ...}}``). Each sample of a shard
is the WebDataset pair ``KEY.jpg`` (or .jpeg/.png/.webp: the image file's bytes, as on disk) and
``KEY.cls`` (its class index as text); :func:`write_shards` makes such a folder from an image folder.

:class:`ShardLoader` reads the shards with the ``webdataset`` library, decodes each image like an image
store does (upright, shorter side shrunk to ``store_size``, uint8) and makes the same batches as
``StoreLoader``: RandomResizedCrop + flip views for training, resize + centre crop for evaluation,
normalised float (N, C, h, w) and int64 labels. Training order: the shards are shuffled per (seed,
epoch) and dealt out to the ranks (``shards[rank::world_size]``: disjoint), then a shuffle buffer seeded
by (seed, epoch, rank) mixes the samples; every rank yields ``len(loader)`` batches (the global count
over the ranks), reading its shards again if its share runs short. Unreadable samples raise a DataError
naming shard and key, or are skipped and counted in ``loader.skipped`` with ``skip_bad_images``.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from convforge.data.imagefolder import list_image_folder
from convforge.data.loader import flip_where, normalize
from convforge.data.paths import printable
from convforge.data.store import decode_problem, decode_upright, image_warnings, stored_size
from convforge.data.views import crop_resize, flip_params, random_resized_crop_params, resize_center_crop_batch
from convforge.errors import ConfigError, DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SPLITS = ("train", "val", "test")
DEFAULT_SHUFFLE_BUFFER = 2000  # samples the training shuffle buffer holds


@dataclass(frozen=True)
class ShardSet:
    """The shards of one ``wds:DIR``: ``splits`` maps a split to its (shard path, sample count) list."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]

    def count(self, split: str) -> int:
        return sum(n for _, n in self.splits[split])


def write_shards(folder: str | Path, out_dir: str | Path, shard_size: int = 1000, seed: int = 0) -> ShardSet:
    """Write the image folder ``folder`` (``train/<class>/*``, ``val/<class>/*``, ...) as WebDataset shards
    of ``shard_size`` samples in ``out_dir``, each split's files in a seeded random order (so that every
    shard mixes the classes), plus ``classes.json``. Files are copied as they are (no decoding)."""
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1 sample, got {shard_size}")
    listing = list_image_folder(Path(folder))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for split, files in listing.files.items():
        order = list(files)
        random.Random(f"{seed}:{split}").shuffle(order)
        for number, start in enumerate(range(0, len(order), shard_size)):
            name = f"{split}-{number:06d}.tar"
            _write_tar(out / name, order[start:start + shard_size], start)
            counts[name] = len(order[start:start + shard_size])
    (out / "classes.json").write_text(json.dumps({"classes": list(listing.classes), "counts": counts}, indent=1))
    return open_shards(out)


def _write_tar(path: Path, files: Sequence[tuple[str, int]], first: int) -> None:
    """One shard: ``KEY.EXT`` (the file's bytes) and ``KEY.cls`` per sample, reproducible byte for byte."""
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (file, label) in enumerate(files, start=first):
            ext = Path(file).suffix.lower().lstrip(".") or "jpg"
            for member, data in ((f"{i:09d}.{ext}", Path(file).read_bytes()), (f"{i:09d}.cls", b"%d" % label)):
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    partial.replace(path)


def open_shards(root: str | Path) -> ShardSet:
    """The shards and classes of ``wds:DIR``; a missing ``classes.json`` or split raises a DataError saying so."""
    root = Path(root)
    try:
        index = json.loads((root / "classes.json").read_text())
        classes = [str(c) for c in index["classes"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{printable(root)} is not a shard folder: it needs classes.json with the class names "
                        f"({exc}); write one with convforge.data.shards.write_shards") from None
    counts = index.get("counts", {})
    splits = {}
    for split in SPLITS:
        paths = sorted(root.glob(f"{split}-*.tar"))
        if paths:
            splits[split] = [(str(p), int(counts[p.name]) if p.name in counts else _count(p)) for p in paths]
    if not splits:
        raise DataError(f"no shards in {printable(root)}: expected train-*.tar and val-*.tar (or test-*.tar)")
    return ShardSet(root, classes, splits)


def _count(path: Path) -> int:
    """Samples in a shard, from its member names (read once when classes.json does not give them)."""
    with tarfile.open(path) as tar:
        return len({name.split(".", 1)[0] for name in tar.getnames() if name.rsplit(".", 1)[-1] in IMAGE_EXTS})


def decode_sample(data: bytes, channels: int, store_size: int | None) -> torch.Tensor:
    """One image file's bytes as an image store keeps it: uint8 (C, H, W), upright, shorter side <= store_size."""
    with image_warnings(), Image.open(io.BytesIO(data)) as img:
        size = stored_size(img, store_size)
    array = decode_upright(io.BytesIO(data), size, channels, store_size)  # type: ignore[arg-type]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class ShardLoader:
    """Batches ``(x, y)`` of one split of a :class:`ShardSet`, like ``StoreLoader``'s (see the module text)."""

    def __init__(self, shards: ShardSet, split: str, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 *, train: bool, image_size: int | Sequence[int], store_size: int, crop_pct: float = 0.875,
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True,
                 channels: int = 3, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, skip_bad_images: bool = False,
                 device: torch.device | str = "cpu", channels_last: bool = False) -> None:
        if split not in shards.splits:
            raise DataError(f"{printable(shards.root)} has no {split}-*.tar shards")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"batch size must be >= 1 and rank in [0, world size), got {batch_size}, {rank}/{world_size}")
        if len(shards.splits[split]) < world_size:
            raise DataError(f"{split} has {len(shards.splits[split])} shard(s) for {world_size} ranks: write at "
                            f"least one shard per rank (a smaller shard_size)")
        self.shards, self.split, self.batch_size = shards, split, batch_size
        self.mean, self.std, self.train = tuple(mean), tuple(std), train
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.store_size, self.crop_pct, self.scale, self.ratio = store_size, crop_pct, tuple(scale), tuple(ratio)
        self.flip, self.channels, self.seed, self.rank, self.world_size = flip, channels, seed, rank, world_size
        self.shuffle_buffer, self.skip_bad_images = shuffle_buffer if train else 0, skip_bad_images
        self.device, self.channels_last = torch.device(device), channels_last
        self.epoch, self.skipped = 0, 0
        if train:
            random_resized_crop_params(torch.ones(1, 2, dtype=torch.long), self.scale, self.ratio)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Training: full global batches over all ranks; evaluation: this rank's batches, the last one partial."""
        if self.train:
            return self.shards.count(self.split) // (self.batch_size * self.world_size)
        mine = sum(n for _, n in self.rank_shards(0))
        return -(-mine // self.batch_size)

    def rank_shards(self, epoch: int, rerun: int = 0) -> list[tuple[str, int]]:
        """This rank's shards in ``epoch`` (its ``rerun``-th pass): shuffled per (seed, epoch, pass) for
        training, in name order for evaluation, dealt out ``[rank::world_size]``."""
        shards = list(self.shards.splits[self.split])
        if self.train:
            random.Random(f"{self.seed}:{epoch}:{rerun}").shuffle(shards)
        return shards[self.rank::self.world_size]

    def samples(self, epoch: int) -> Iterator[tuple[torch.Tensor, int]]:
        """This rank's decoded (image, label) samples of ``epoch`` in order (shuffle buffer applied)."""
        rng = random.Random(f"{self.seed}:{epoch}:{self.rank}")
        buffer: list[tuple[torch.Tensor, int]] = []
        rerun = 0
        while True:
            for sample in self._read(self.rank_shards(epoch, rerun)):
                if self.shuffle_buffer <= 1:
                    yield sample
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
            if not self.train:
                break
            rerun += 1  # training never runs dry: every rank yields len(self) batches
            rng.shuffle(buffer)
            yield from buffer
            buffer = []

    def _read(self, shards: list[tuple[str, int]]) -> Iterator[tuple[torch.Tensor, int]]:
        import webdataset as wds

        urls = [path for path, _ in shards]
        stream = wds.WebDataset(urls, handler=self._tar_problem, shardshuffle=False, nodesplitter=None,
                                workersplitter=None, empty_check=False)
        for sample in stream:
            where = f"{printable(str(sample.get('__url__', '?')))} sample {sample.get('__key__')!r}"
            try:
                data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
                if data is None or "cls" not in sample:
                    raise DataError(f"{where} lacks an image (.{'/.'.join(IMAGE_EXTS)}) or its .cls label")
                label = int(sample["cls"])
                if not 0 <= label < len(self.shards.classes):
                    raise DataError(f"{where} has class index {label}, outside the {len(self.shards.classes)} classes")
                image = decode_sample(data, self.channels, self.store_size)
            except Exception as exc:  # noqa: BLE001 - a bad sample is named, or counted and skipped
                if self.skip_bad_images:
                    self.skipped += 1
                    continue
                if isinstance(exc, DataError):
                    raise
                raise DataError(f"cannot decode {where}: {decode_problem(where, exc)}; fix the shard or pass "
                                f"--skip-bad-images") from None
            yield image, label

    def _tar_problem(self, exc: BaseException) -> bool:
        """webdataset's handler for a shard it cannot read: count and go on, or a DataError."""
        if self.skip_bad_images:
            self.skipped += 1
            return True
        raise DataError(f"cannot read a {self.split} shard of {printable(self.shards.root)}: "
                        f"{printable(str(exc))}; fix the shard or pass --skip-bad-images") from None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, limit = self.epoch, len(self) if self.train else None
        images: list[torch.Tensor] = []
        labels: list[int] = []
        made = 0
        for image, label in self.samples(epoch):
            images.append(image)
            labels.append(label)
            if len(images) == self.batch_size:
                yield self._batch(images, labels, epoch, made)
                made, images, labels = made + 1, [], []
                if limit is not None and made >= limit:
                    return
        if images and not self.train:
            yield self._batch(images, labels, epoch, made)

    def _batch(self, images: list[torch.Tensor], labels: list[int], epoch: int,
               batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The views of one batch, normalised on ``device``; training draws are seeded by (seed, epoch, rank, batch)."""
        if self.train:
            key = ((self.seed * 1_000_003 + epoch) * 1_000_033 + self.rank) * 1_000_037 + batch_index
            gen = torch.Generator().manual_seed(key % (1 << 62))
            sizes = torch.tensor([list(image.shape[1:]) for image in images], dtype=torch.long)
            x = crop_resize(images, random_resized_crop_params(sizes, self.scale, self.ratio, gen), self.image_size)
            flips = flip_params(len(images), gen)
            if self.flip:
                x = flip_where(x, flips)
        else:
            x = resize_center_crop_batch(images, self.image_size, self.crop_pct)
        x = normalize(x.to(self.device), self.mean, self.std)
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        return x, torch.tensor(labels, dtype=torch.int64, device=self.device)
