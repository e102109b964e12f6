"""Shared helpers for the benchmarks: locating ../shared data and recording results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CONVFORGE_SHARED", ROOT.parent / "shared"))
DATA_ROOT = Path(os.environ.get("CONVFORGE_BENCH_DATA", "/tmp/convforge-bench-data"))


def extracted(archive: str, folder: str) -> Path:
    """Extract ``../shared/datasets/ARCHIVE`` once into DATA_ROOT and return DATA_ROOT/FOLDER."""
    target = DATA_ROOT / folder
    if (target / ".complete").is_file():
        return target
    source = SHARED / "datasets" / archive
    if not source.is_file():
        raise SystemExit(f"{source} not found: the benchmarks need ../shared/datasets (set CONVFORGE_SHARED)")
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    print(f"extracting {source} into {DATA_ROOT} ...", flush=True)
    with tarfile.open(source) as tar:
        tar.extractall(DATA_ROOT, filter="data")
    (target / ".complete").write_text("ok\n")
    return target


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def record(section: str, lines: list[str], save: bool = True) -> None:
    """Print ``lines`` and, if ``save``, append them under a dated heading to benchmarks/RESULTS.md."""
    text = f"\n### {section}, {time.strftime('%Y-%m-%d')}\nMachine: {machine()}\n\n" + "\n".join(lines) + "\n"
    print(text)
    if not save:
        return
    with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as handle:
        handle.write(text)


def convforge_json(*args: str) -> tuple[dict, float]:
    """Run ``python -m convforge ARGS --json`` (progress on the terminal); its JSON result and wall time (s)."""
    command = [sys.executable, "-m", "convforge", *args, "--json"]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(command)}")
    return json.loads(proc.stdout), wall


def read_records(run_dir: Path) -> list[dict]:
    """The per-epoch records of a run (its metrics.jsonl)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
