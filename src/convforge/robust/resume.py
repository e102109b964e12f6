"""The resume file of a robustness evaluation: each finished piece of work, recorded atomically.

``out_dir/robust-progress.json`` holds the ``config`` that defines the evaluated points (model fingerprint,
data, split, samples, seed, chunking) and one entry per finished chunk, keyed by everything that defines
its result (attack, norm, eps, steps, ..., chunk bounds). A rerun with the same config reuses the entries
whose keys it asks for; a file with another config is set aside: the evaluation starts afresh.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

from convforge.fileio import atomic_write_json

PROGRESS_FILE = "robust-progress.json"
FORMAT = 1


def model_fingerprint(model: torch.nn.Module) -> str:
    """A CRC-32 of the model's parameters and buffers (names, shapes and bytes): changes when the weights do."""
    crc = 0
    for name, tensor in model.state_dict().items():
        crc = zlib.crc32(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode(), crc)
        data = tensor.detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"", crc)
    return f"{crc:08x}"


def entry_key(**fields: Any) -> str:
    """A stable key of a piece of work from the fields that define its result."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def derived_seed(seed: int, key: str) -> int:
    """A seed of its own for each piece of work: its result does not depend on which others ran before it."""
    return zlib.crc32(f"{seed}|{key}".encode()) & 0x7FFFFFFF


class ProgressLog:
    """Finished chunks of one evaluation; without ``out_dir`` it only counts (nothing is written)."""

    def __init__(self, out_dir: str | Path | None, config: dict[str, Any], log: Callable[[str], None]) -> None:
        self.path = Path(out_dir) / PROGRESS_FILE if out_dir is not None else None
        self.config = json.loads(json.dumps(config))
        self.entries: dict[str, dict[str, Any]] = {}
        self.skipped = 0
        self.note: str | None = None
        if self.path is not None and self.path.exists():
            self._load(log)

    def _load(self, log: Callable[[str], None]) -> None:
        assert self.path is not None
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            self.note = f"{self.path} could not be read ({exc}); starting afresh"
        else:
            old = saved.get("config") if isinstance(saved, dict) else None
            if not isinstance(saved, dict) or saved.get("format") != FORMAT or old != self.config:
                old = old if isinstance(old, dict) else {}
                changed = sorted(k for k in set(self.config) | set(old) if old.get(k) != self.config.get(k))
                self.note = (f"{self.path} was written for other arguments ({', '.join(changed) or 'format'}); "
                             "starting afresh")
            else:
                self.entries = dict(saved.get("entries") or {})
                if self.entries:
                    self.note = f"resuming from {self.path}: {len(self.entries)} finished chunks recorded"
        if self.note:
            log(self.note)

    def get(self, key: str) -> dict[str, Any] | None:
        """The recorded result of ``key``, counted as skipped work; None when it has not been done."""
        entry = self.entries.get(key)
        if entry is not None:
            self.skipped += 1
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Record a finished chunk (one atomic rewrite of the file)."""
        self.entries[key] = entry
        if self.path is not None:
            atomic_write_json(self.path, {"format": FORMAT, "config": self.config, "entries": self.entries})


def bits(mask: torch.Tensor) -> str:
    """A boolean mask as a string of 0s and 1s (compact in JSON)."""
    return "".join("1" if v else "0" for v in mask.tolist())


def from_bits(text: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)
