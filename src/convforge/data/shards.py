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
Training views may add TrivialAugment or RandAugment (the ops of ``StoreLoader``), or be evaluation views
(``center``). ``iter_from(k)`` resumes an epoch exactly at batch k by reading its first k batches' samples
again without making their views (the sample stream is a function of seed, epoch and rank only).
:mod:`convforge.data.shard_dataset` makes ``wds:DIR`` a training and evaluation data set.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from convforge.data.imagefolder import list_image_folder
from convforge.data.loader import normalize
from convforge.data.paths import printable
from convforge.data.randaugment import RANDAUGMENT_MAGNITUDE, RANDAUGMENT_NUM_OPS, check_randaugment
from convforge.data.store import GRAY_MODES, decode_problem, decode_upright, image_warnings, stored_size
from convforge.data.store_loader import scheduled_crop_size, train_views
from convforge.data.views import EvalView, check_interpolation, random_resized_crop_params, resize_center_crop_batch
from convforge.errors import ConfigError, DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SPLITS = ("train", "val", "test")
DEFAULT_SHUFFLE_BUFFER = 2000  # samples the training shuffle buffer holds
SHARD_AUGMENTS = ("trivialaugment", "randaugment")  # as StoreLoader's
RawSample = tuple[bytes, int, str]  # an image file's bytes, its label, where it is (shard and key)


@dataclass(frozen=True)
class ShardSet:
    """The shards of one ``wds:DIR``: ``splits`` maps a split to its (shard path, sample count) list;
    ``channels``: 1 when ``write_shards`` found every image grayscale, 3 otherwise (None: not recorded)."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    channels: int | None = None

    def count(self, split: str) -> int:
        return sum(n for _, n in self.splits[split])


def write_shards(folder: str | Path, out_dir: str | Path, shard_size: int = 1000, seed: int = 0) -> ShardSet:
    """Write the image folder ``folder`` (``train/<class>/*``, ``val/<class>/*``, ...) as WebDataset shards
    of ``shard_size`` samples in ``out_dir``, each split's files in a seeded random order (so that every
    shard mixes the classes), plus ``classes.json`` (with ``channels``: 1 when every readable image is
    grayscale, as an image store decides). Files are copied as they are (no decoding)."""
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1 sample, got {shard_size}")
    listing = list_image_folder(Path(folder))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    gray = True
    for split, files in listing.files.items():
        gray = gray and all(_is_gray(file) is not False for file, _ in files)
        order = list(files)
        random.Random(f"{seed}:{split}").shuffle(order)
        for number, start in enumerate(range(0, len(order), shard_size)):
            name = f"{split}-{number:06d}.tar"
            _write_tar(out / name, order[start:start + shard_size], start)
            counts[name] = len(order[start:start + shard_size])
    index = {"classes": list(listing.classes), "channels": 1 if gray else 3, "counts": counts}
    (out / "classes.json").write_text(json.dumps(index, indent=1))
    return open_shards(out)


def _is_gray(file: str) -> bool | None:
    """Whether the image file is grayscale, from its header (None: unreadable)."""
    try:
        with image_warnings(), Image.open(file) as img:
            return img.mode in GRAY_MODES
    except Exception:  # noqa: BLE001 - an unreadable file is the reader's to report
        return None


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
    channels = index.get("channels")
    return ShardSet(root, classes, splits, int(channels) if channels in (1, 3) else None)


def _count(path: Path) -> int:
    """Samples in a shard, from its member names (read once when classes.json does not give them)."""
    with tarfile.open(path) as tar:
        return len({name.split(".", 1)[0] for name in tar.getnames() if name.rsplit(".", 1)[-1] in IMAGE_EXTS})


def decode_sample(data: bytes, channels: int, store_size: int | None) -> torch.Tensor:
    """One image file's bytes as an image store keeps it: uint8 (C, H, W) with channels-last strides, upright,
    shorter side <= store_size."""
    with image_warnings(), Image.open(io.BytesIO(data)) as img:
        size = stored_size(img, store_size)
    array = decode_upright(io.BytesIO(data), size, channels, store_size)  # type: ignore[arg-type]
    return torch.from_numpy(np.require(array, requirements=["C", "W"])).permute(2, 0, 1)


class ShardLoader:
    """Batches ``(x, y)`` of one split of a :class:`ShardSet`, like ``StoreLoader``'s (see the module text).

    ``augment``: None, ``"trivialaugment"`` or ``"randaugment"`` (``randaugment`` = (N, M)) after the crop and
    flip; ``center``: training order with evaluation views; ``size_schedule(epoch)``: the training crop of each
    epoch (progressive resizing); ``interpolation``: the evaluation views' resize filter. ``last_indices`` and
    ``clean_batch`` give the evaluation views of the batch last yielded (for distillation teachers)."""

    def __init__(self, shards: ShardSet, split: str, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 *, train: bool, image_size: int | Sequence[int], store_size: int, crop_pct: float = 0.875,
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True,
                 augment: str | None = None, center: bool = False,
                 randaugment: Sequence[int] = (RANDAUGMENT_NUM_OPS, RANDAUGMENT_MAGNITUDE),
                 size_schedule: Callable[[int], Sequence[int]] | None = None,
                 channels: int = 3, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, skip_bad_images: bool = False,
                 device: torch.device | str = "cpu", channels_last: bool = False,
                 interpolation: str = "bilinear") -> None:
        if split not in shards.splits:
            raise DataError(f"{printable(shards.root)} has no {split}-*.tar shards")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"batch size must be >= 1 and rank in [0, world size), got {batch_size}, {rank}/{world_size}")
        if train and len(shards.splits[split]) < world_size:  # evaluation: a rank without shards adds nothing
            raise DataError(f"{split} has {len(shards.splits[split])} shard(s) for {world_size} ranks: write at "
                            f"least one shard per rank (a smaller shard_size)")
        if augment not in (None, *SHARD_AUGMENTS):
            raise ConfigError(f"unknown shard augment {augment!r}: use None or one of {', '.join(SHARD_AUGMENTS)}")
        self.shards, self.split, self.batch_size = shards, split, batch_size
        self.mean, self.std, self.train = tuple(mean), tuple(std), train
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.store_size, self.scale, self.ratio = store_size, tuple(scale), tuple(ratio)
        self.flip, self.augment, self.center = flip, augment, center
        self.randaugment, self.size_schedule = (int(randaugment[0]), int(randaugment[1])), size_schedule
        self.channels, self.seed, self.rank, self.world_size = channels, seed, rank, world_size
        self.shuffle_buffer, self.skip_bad_images = shuffle_buffer if train else 0, skip_bad_images
        self.device, self.channels_last = torch.device(device), channels_last
        self.eval_view = EvalView(self.image_size, crop_pct, check_interpolation(interpolation))
        self.epoch, self.skipped = 0, 0
        self.last_indices = torch.empty(0, dtype=torch.long)
        self._last_images: list[torch.Tensor] = []
        if train:
            random_resized_crop_params(torch.ones(1, 2, dtype=torch.long), self.scale, self.ratio)
            check_randaugment(*self.randaugment)
            self.crop_size(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def crop_size(self, epoch: int | None = None) -> tuple[int, int]:
        """The (h, w) of the training views of ``epoch`` (default: the current one)."""
        return scheduled_crop_size(self.image_size, self.size_schedule, self.epoch if epoch is None else epoch)

    def epoch_record(self) -> dict[str, list[int]]:
        """What the epoch record says of this loader's epoch: ``train_size`` [h, w] of its training views."""
        return {"train_size": list(self.crop_size())} if self.train else {}

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
        for raw in self.raw_samples(epoch):
            image = self._decode(raw)
            if image is not None:
                yield image, raw[1]

    def raw_samples(self, epoch: int) -> Iterator[RawSample]:
        """This rank's undecoded samples of ``epoch`` in order: the shuffle buffer holds file bytes, not pixels."""
        rng = random.Random(f"{self.seed}:{epoch}:{self.rank}")
        buffer: list[RawSample] = []
        rerun = 0
        while True:
            read = 0
            for sample in self._read(self.rank_shards(epoch, rerun)):
                read += 1
                if self.shuffle_buffer <= 1:
                    yield sample
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
            if not self.train or not read:  # a pass that read nothing would loop for ever
                break
            rerun += 1  # training never runs dry: every rank yields len(self) batches
            rng.shuffle(buffer)
            yield from buffer
            buffer = []

    def sample(self, count: int, seed: int = 0, pool: int = 2) -> list[torch.Tensor]:
        """A seeded sample of ``count`` decoded images of the split: a reservoir over the first ``pool * count``
        samples of its shards in a seeded order (only the chosen ones are decoded)."""
        shards = list(self.shards.splits[self.split])
        random.Random(f"sample:{seed}").shuffle(shards)
        rng = random.Random(f"sample:{seed}:reservoir")
        chosen: list[RawSample] = []
        for n, raw in enumerate(self._read(shards)):
            if n >= pool * count:
                break
            if len(chosen) < count:
                chosen.append(raw)
            elif (j := rng.randrange(n + 1)) < count:
                chosen[j] = raw
        return [image for image in map(self._decode, chosen) if image is not None]

    def _read(self, shards: list[tuple[str, int]]) -> Iterator[RawSample]:
        """The (bytes, label, where) samples of ``shards`` in order; a sample without image or valid label raises
        a DataError (or is counted and skipped)."""
        import webdataset as wds

        if not shards:
            return
        stream = wds.WebDataset([path for path, _ in shards], handler=self._tar_problem, shardshuffle=False,
                                nodesplitter=None, workersplitter=None, empty_check=False)
        for sample in stream:
            where = f"{printable(str(sample.get('__url__', '?')))} sample {sample.get('__key__')!r}"
            try:
                data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
                if data is None or "cls" not in sample:
                    raise DataError(f"{where} lacks an image (.{'/.'.join(IMAGE_EXTS)}) or its .cls label")
                label = int(sample["cls"])
                if not 0 <= label < len(self.shards.classes):
                    raise DataError(f"{where} has class index {label}, outside the {len(self.shards.classes)} classes")
            except (DataError, ValueError) as exc:
                if self.skip_bad_images:
                    self.skipped += 1
                    continue
                if isinstance(exc, DataError):
                    raise
                raise DataError(f"{where} has a .cls label that is not a class index: {exc}") from None
            yield data, label, where

    def _decode(self, raw: RawSample) -> torch.Tensor | None:
        """The sample's image as the store keeps it; None (counted) for a bad one with ``skip_bad_images``."""
        data, _, where = raw
        try:
            return decode_sample(data, self.channels, self.store_size)
        except Exception as exc:  # noqa: BLE001 - a bad sample is named, or counted and skipped
            if self.skip_bad_images:
                self.skipped += 1
                return None
            raise DataError(f"cannot decode {where}: {decode_problem(where, exc)}; fix the shard or pass "
                            f"--skip-bad-images") from None

    def _tar_problem(self, exc: BaseException) -> bool:
        """webdataset's handler for a shard it cannot read: count and go on, or a DataError."""
        if self.skip_bad_images:
            self.skipped += 1
            return True
        raise DataError(f"cannot read a {self.split} shard of {printable(self.shards.root)}: "
                        f"{printable(str(exc))}; fix the shard or pass --skip-bad-images") from None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from ``start_batch`` on: the samples of the earlier batches are read again (and
        decoded only with ``skip_bad_images``, to count the good ones) but make no views, so a resumed epoch
        gets the batches of an uninterrupted one. The epoch is read now."""
        epoch, limit = self.epoch, len(self) if self.train else None
        return self._batches(epoch, start_batch, limit)

    def _batches(self, epoch: int, start_batch: int, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skip = start_batch * self.batch_size
        images: list[torch.Tensor] = []
        labels: list[int] = []
        made = start_batch
        if limit is not None and made >= limit:
            return
        for raw in self.raw_samples(epoch):
            if skip:
                skip -= not self.skip_bad_images or self._decode(raw) is not None
                continue
            image = self._decode(raw)
            if image is None:
                continue
            images.append(image)
            labels.append(raw[1])
            if len(images) == self.batch_size:
                yield self._batch(images, labels, epoch, made)
                made, images, labels = made + 1, [], []
                if limit is not None and made >= limit:
                    return
        if images and not self.train:
            yield self._batch(images, labels, epoch, made)

    def clean_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """The evaluation views (resize + centre crop), normalised, of the batch last yielded at ``indices``."""
        x = resize_center_crop_batch([self._last_images[int(i)] for i in indices], *self.eval_view)
        return self._finish(x)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return normalize(x.to(self.device), self.mean, self.std, layout)

    def _batch(self, images: list[torch.Tensor], labels: list[int], epoch: int,
               batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The views of one batch, normalised on ``device``; training draws are seeded by (seed, epoch, rank, batch)."""
        self._last_images, self.last_indices = images, torch.arange(len(images))
        if self.train and not self.center:
            x = self._train_views(images, epoch, batch_index)
        else:
            x = resize_center_crop_batch(images, *self.eval_view)
        return self._finish(x), torch.tensor(labels, dtype=torch.int64, device=self.device)

    def _train_views(self, images: list[torch.Tensor], epoch: int, batch_index: int) -> torch.Tensor:
        """RandomResizedCrop (+ flip, + TrivialAugment or RandAugment) views, drawn as StoreLoader draws them."""
        key = ((self.seed * 1_000_003 + epoch) * 1_000_033 + self.rank) * 1_000_037 + batch_index
        gen = torch.Generator().manual_seed(key % (1 << 62))
        sizes = torch.tensor([list(image.shape[1:]) for image in images], dtype=torch.long)
        return train_views(images, sizes, self.crop_size(epoch), gen, scale=self.scale, ratio=self.ratio,
                           flip=self.flip, augment=self.augment, randaugment=self.randaugment)
