"""The run directory, and the one place that decides who writes files (rank 0)."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convforge.fileio import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class ProcessRole:
    """This process's place in a (possibly distributed) run; only the main process writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "ProcessRole":
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )


def default_run_dir(model: str, data: str) -> Path:
    data_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(data.partition(":")[2] or data).name or data).strip("-")
    return Path("runs") / f"{model}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    """config.yaml, metrics.jsonl, summary.json, checkpoints and train.log; writes only on the main process."""

    def __init__(self, path: str | Path, role: ProcessRole) -> None:
        self.path = Path(path)
        self.role = role
        self.records: list[dict[str, Any]] = []
        if role.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            self.remove_stale_temporaries()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files left by a process killed in the middle of an atomic write."""
        stale = sorted(self.path.glob(".*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def file(self, name: str) -> Path:
        return self.path / name

    def log(self, message: str) -> None:
        if self.role.is_main:
            line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n"
            with open(self.file("train.log"), "a", encoding="utf-8") as handle:
                handle.write(line)

    def write_text(self, name: str, text: str) -> None:
        if self.role.is_main:
            atomic_write_text(self.file(name), text)

    def write_json(self, name: str, obj: Any) -> None:
        if self.role.is_main:
            atomic_write_json(self.file(name), obj)

    def load_records(self, up_to_epoch: int) -> None:
        """Keep the metric records of epochs ``<= up_to_epoch`` (after a resume)."""
        path = self.file("metrics.jsonl")
        self.records = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record.get("epoch", 0) <= up_to_epoch:
                        self.records.append(record)

    def append_record(self, record: dict[str, Any]) -> None:
        """Add one epoch's metrics; the whole file is rewritten atomically, so no line is ever half-written."""
        self.records.append(record)
        if self.role.is_main:
            atomic_write_text(self.file("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in self.records))
