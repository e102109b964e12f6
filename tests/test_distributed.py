"""DistributedDataParallel on CPU (gloo): 2 x 32 equals 1 x 64, DDP resume, a killed rank ends the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import read_jsonl, run_cli

DATA = "synthetic:classes=4,size=8,train=256,test=64"
COMMON = ["--data", DATA, "--epochs", "2", "--lr", "0.02", "--ema", "--ema-decay", "0.9", "--seed", "3", "--threads", "1"]
TIMING_KEYS = ("images_per_s", "train_time_s", "eval_time_s", "elapsed_s")


def _weights(run: Path, name: str = "last.safetensors") -> dict[str, torch.Tensor]:
    return load_file(run / name)


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(run / "metrics.jsonl")]


def _assert_close_runs(a: Path, b: Path, atol: float) -> None:
    for name in ("last.safetensors", "best.safetensors"):
        wa, wb = _weights(a, name), _weights(b, name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.allclose(wa[key].double(), wb[key].double(), atol=atol, rtol=0), (
                f"{name}:{key} differs by {(wa[key].double() - wb[key].double()).abs().max():.3g}")
    ma, mb = _metrics(a), _metrics(b)
    assert len(ma) == len(mb)
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], abs=1e-4), (key, ra, rb)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    result = run_cli("train", *COMMON, "--batch-size", "64", "--out", out, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_processes_of_32_equal_one_process_of_64(tmp_path, single_process_run):
    out = tmp_path / "ddp"
    result = run_cli("train", *COMMON, "--batch-size", "32", "--nproc-per-node", "2", "--sync-bn", "--json",
                     "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = __import__("json").loads(result.stdout.strip().splitlines()[-1])  # only rank 0 prints
    assert summary["status"] == "completed"
    _assert_close_runs(out, single_process_run, atol=1e-5)
    config = (out / "config.yaml").read_text()
    assert "lr: 0.02" in config
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("train.log")) == ["train.log"]


def test_resumed_ddp_run_equals_uninterrupted(tmp_path, single_process_run):
    out = tmp_path / "ddp"
    args = ["train", *COMMON, "--batch-size", "32", "--nproc-per-node", "2", "--sync-bn", "--save-every-steps", "3",
            "--out", out]
    # both ranks die with SIGKILL at their 7th step (epoch 2, after the step-6 save); then the run is resumed, still on 2 processes
    killed = run_cli(*args, cwd=tmp_path, env={"CONVFORGE_FAULTS": "step@7:kill"})
    assert killed.returncode != 0
    state = load_file(out / "resume.safetensors")
    assert state  # a complete resume state from the step-6 save
    resumed = run_cli(*args, "--resume", out, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out}" in resumed.stderr
    _assert_close_runs(out, single_process_run, atol=1e-5)


def test_a_killed_rank_ends_the_job_within_60_seconds(tmp_path):
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "convforge", "train", "--data", "synthetic:classes=3,size=8,train=4096,test=32",
            "--epochs", "50", "--batch-size", "8", "--nproc-per-node", "2", "--out", str(out)]
    launcher = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "config.yaml").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (out / "config.yaml").exists(), "the distributed run did not start"
        time.sleep(1.0)
        workers = _worker_pids(launcher.pid)
        assert len(workers) == 2, workers
        killed_at = time.monotonic()
        os.kill(max(workers), signal.SIGKILL)  # the later-started worker: rank 1
        _, stderr = launcher.communicate(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            for pid in _worker_pids(launcher.pid):  # torchrun starts workers in sessions of their own
                os.kill(pid, signal.SIGKILL)
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    assert took < 60, f"the job took {took:.0f} s to end after a rank died"
    assert "failed" in stderr
    for pid in workers:
        assert not _alive(pid), "a worker outlived the job"


def _worker_pids(parent: int) -> list[int]:
    """PIDs of the python processes started by the torchrun agent inside ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"convforge" in b" ".join(cmdline):
            found.append(int(entry.name))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("method", ["fgsm-rs", "trades"])
def test_adversarial_training_under_ddp(tmp_path, method):
    """Each rank attacks its own share of the batch (random starts seeded per rank); TRADES's second, clean
    forward goes through the DDP wrapper too; EMA and the per-epoch PGD evaluation work as on one process."""
    out = tmp_path / "ddp"
    result = run_cli("train", *COMMON, "--batch-size", "32", "--nproc-per-node", "2", "--adv-train", method,
                     "--adv-eval-samples", "32", "--json", "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["best_metric"] == "test_pgd10_top1"
    records = read_jsonl(out / "metrics.jsonl")
    assert len(records) == 2 and all(0 <= r["test_pgd10_top1"] <= 100 for r in records)
    assert all(torch.isfinite(w).all() for w in _weights(out).values())
