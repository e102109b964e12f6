"""Crash safety: SIGKILL at many points (including mid-write), SIGINT/SIGTERM, a full disk, NaN batches.

Kills are placed with ``CONVFORGE_FAULTS`` (see src/convforge/faults.py) so that each one lands
at a known point: during an optimizer step, an evaluation, or inside the atomic write of a
named file after its temporary copy is written and before it replaces the old one.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convforge import TrainConfig, load_checkpoint, fit
from convforge.errors import DiskFullError, NonFiniteLossError
from convforge.train.checkpoint import read_checkpoint_meta
from helpers import TINY_SYNTH, read_jsonl, run_cli

# 4 epochs of 8 steps (64 images, batch 8); the resume state is also saved every 3 steps.
RECIPE = ["--data", TINY_SYNTH, "--epochs", "4", "--batch-size", "8", "--ema", "--ema-decay", "0.9",
          "--save-every-steps", "3", "--threads", "1", "--seed", "5"]
STEPS_PER_EPOCH = 8

# Each rule kills one process; the next process resumes the run. Counters restart in every process.
KILL_CHAIN = [
    "step@2:kill",                            # before the first save: the resume starts over
    "write:config.yaml@1:kill",               # while the resumed run rewrites its config
    "step@5:kill",                            # mid epoch 1, after the step-3 save
    "write:resume.safetensors@2:kill",        # inside a mid-epoch save of the resume state
    "eval@1:kill",                            # during the first evaluation
    "write:metrics.jsonl@1:kill",             # inside the metrics rewrite
    "write:last.safetensors@1:kill",          # inside the checkpoint write
    "write:best.safetensors@1:kill",          # inside the best-checkpoint write
    "step@4:kill",                            # mid epoch 2
    "write:resume.safetensors@3:kill",        # the state save of a later step
    "write:last.safetensors@2:kill",          # the epoch-2 or epoch-3 checkpoint
    "step@6:kill",                            # mid epoch 3
    "write:summary.json@1:kill",              # while writing the final summary
]


def _train(out: Path, *extra: str, faults: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    args = ["train", *RECIPE, "--out", out, *extra]
    return run_cli(*args, cwd=out.parent, env={"CONVFORGE_FAULTS": faults}, timeout=timeout)


def _progress(run: Path) -> tuple[int, int] | None:
    """(epoch, batch) the resume state points at, or None when there is none yet."""
    state = run / "resume.safetensors"
    if not state.exists():
        return None
    extra = read_checkpoint_meta_raw(state)["extra"]
    return extra["epoch"], extra["batch"]


def read_checkpoint_meta_raw(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["convforge"])


def _assert_run_dir_consistent(run: Path) -> None:
    """Every checkpoint present loads completely and agrees with its sidecar; every JSON file parses."""
    for name in ("last", "best"):
        path = run / f"{name}.safetensors"
        if path.exists():
            checkpoint = load_checkpoint(path)
            assert all(torch.isfinite(v).all() for v in checkpoint.model.state_dict().values() if v.is_floating_point())
            sidecar = path.with_suffix(".json")
            if sidecar.exists():
                # the sidecar is written after the weights: it may lag by one epoch, never lead
                assert json.loads(sidecar.read_text())["epoch"] <= read_checkpoint_meta(path)["epoch"]
    if (run / "resume.safetensors").exists():
        load_file(run / "resume.safetensors")  # complete and parseable
    for name in ("metrics.jsonl",):
        if (run / name).exists():
            read_jsonl(run / name)
    for name in ("summary.json",):
        if (run / name).exists():
            json.loads((run / name).read_text())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _train(out)
    assert result.returncode == 0, result.stderr
    return out


def _assert_same_final_state(run: Path, reference: Path) -> None:
    for name in ("last.safetensors", "best.safetensors"):
        ours, theirs = load_file(run / name), load_file(reference / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key} differs from the uninterrupted run"
    strip = ("images_per_s", "train_time_s", "eval_time_s", "elapsed_s")
    ours = [{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(run / "metrics.jsonl")]
    theirs = [{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(reference / "metrics.jsonl")]
    assert ours == theirs
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_sigkill_at_thirteen_points_then_resume_equals_uninterrupted(tmp_path, reference_run):
    run = tmp_path / "run"
    killed_at = []
    for index, rule in enumerate(KILL_CHAIN):
        args = ("--resume", run) if (run / "config.yaml").exists() else ()
        if args:
            args = ("--resume", str(run))
        result = _train(run, *args, faults=rule)
        assert result.returncode == -signal.SIGKILL, f"rule {index} ({rule}) did not fire:\n{result.stderr[-2000:]}"
        _assert_run_dir_consistent(run)
        killed_at.append(_progress(run))
    result = _train(run, "--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(run.glob(".*.tmp")), "temporary files of killed writes must be cleaned up on resume"
    _assert_same_final_state(run, reference_run)
    # the kills were spread over the run: the saved states they left behind span the epochs
    epochs_seen = {p[0] for p in killed_at if p is not None}
    assert {0, 1, 2, 3} <= epochs_seen, killed_at


def test_sigkill_from_outside_at_random_times(tmp_path, reference_run):
    """Kills the process from outside at arbitrary moments (not at chosen points), three times in a row."""
    run = tmp_path / "run"
    env = dict(os.environ, CONVFORGE_FAULTS="")
    for delay in (2.6, 3.1, 3.7):
        args = ["--resume", str(run)] if (run / "config.yaml").exists() else []
        process = subprocess.Popen([sys.executable, "-m", "convforge", "train", *RECIPE, "--out", str(run), *args],
                                   cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.kill()
        process.wait(timeout=60)
        _assert_run_dir_consistent(run)
    args = ["--resume", str(run)] if (run / "config.yaml").exists() else []
    result = _train(run, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_final_state(run, reference_run)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_save_state_and_exit_cleanly(tmp_path, sig, code):
    run = tmp_path / "run"
    # 2 epochs of 384 steps; the first periodic save (step 100) says the run is inside its loop
    args = ["train", "--data", "synthetic:classes=3,size=8,train=3072,test=32", "--epochs", "2",
            "--batch-size", "8", "--threads", "1", "--save-every-steps", "100", "--out", str(run)]
    # A suite started as a background job of a non-interactive shell inherits SIGINT ignored; the child must not.
    process = subprocess.Popen([sys.executable, "-m", "convforge", *args], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (run / "resume.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr[-2000:]
    assert f"Resume with: convforge train --resume {run}" in stderr
    assert "Traceback" not in stderr
    epoch, batch = _progress(run)
    assert (epoch, batch) != (0, 0)
    _assert_run_dir_consistent(run)
    result = run_cli("train", "--resume", run, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {run} at epoch {epoch + 1}, batch {batch}" in result.stderr
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]


def test_disk_full_simulated_keeps_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = _train(run, faults="write:last.safetensors@2:enospc")
    assert result.returncode == 4, result.stderr[-2000:]
    assert "disk full" in result.stderr and "last.safetensors" in result.stderr
    assert f"convforge train --resume {run}" in result.stderr and "Traceback" not in result.stderr
    assert load_checkpoint(run / "last.safetensors").meta["epoch"] == 1
    assert not list(run.glob(".*.tmp"))
    _assert_run_dir_consistent(run)


def _fill(folder: Path) -> None:
    """Write zeros into ``folder`` until its file system is full."""
    with open(folder / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the simulated test covers ENOSPC")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_on_a_real_small_tmpfs(small_tmpfs):
    run = small_tmpfs / "run"
    config = TrainConfig(data=TINY_SYNTH, epochs=3, batch_size=8, threads=1, out=str(run))

    def fill_after_first_epoch(epoch: int, record: dict) -> None:
        if epoch == 1:
            _fill(small_tmpfs)

    with pytest.raises(DiskFullError) as caught:
        fit(config, on_epoch_end=fill_after_first_epoch, quiet=True)
    message = str(caught.value)
    assert "disk full" in message and str(run) in message and "--resume" in message
    assert caught.value.exit_code == 4
    assert load_checkpoint(run / "last.safetensors").meta["epoch"] == 1
    assert _progress(run) == (1, 0)
    assert len(read_jsonl(run / "metrics.jsonl")) == 1
    assert not list(run.glob(".*.tmp"))
    # free the space and resume: the run finishes
    (small_tmpfs / "filler").unlink()
    summary = fit(TrainConfig(resume=str(run)), quiet=True)
    assert summary["status"] == "completed" and len(read_jsonl(run / "metrics.jsonl")) == 3


class _NanOnCalls:
    """Stands in for torch.nn.functional in the training loss: cross_entropy returns NaN on chosen calls."""

    def __init__(self, nan_calls: set[int]) -> None:
        self.nan_calls = nan_calls
        self.calls = 0

    def cross_entropy(self, *args, **kwargs):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(*args, **kwargs)
        return loss * float("nan") if self.calls in self.nan_calls else loss


def test_nan_policy_skip_batch_skips_and_counts(tmp_path, monkeypatch):
    engine = importlib.import_module("convforge.train.mixing")

    monkeypatch.setattr(engine, "F", _NanOnCalls({3, 4, 11}))
    config = TrainConfig(data=TINY_SYNTH, epochs=2, batch_size=8, threads=1, out=str(tmp_path / "run"),
                         nan_policy="skip-batch")
    summary = fit(config, quiet=True)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped_batches"] for r in records] == [2, 1]
    assert summary["status"] == "completed" and summary["test_top1"] > 50
    weights = load_checkpoint(tmp_path / "run").model.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_nan_policy_skip_batch_gives_up_after_many_in_a_row(tmp_path, monkeypatch):
    engine = importlib.import_module("convforge.train.mixing")

    monkeypatch.setattr(engine, "F", _NanOnCalls(set(range(40, 200))))
    config = TrainConfig(data="synthetic:classes=3,size=8,train=256,test=32", epochs=2, batch_size=8, threads=1,
                         out=str(tmp_path / "run"), nan_policy="skip-batch")
    with pytest.raises(NonFiniteLossError, match="21 batches in a row") as caught:
        fit(config, quiet=True)
    assert "lower learning rate" in str(caught.value)
    assert load_checkpoint(tmp_path / "run").meta["epoch"] == 1  # the last good checkpoint is kept


def test_fault_rules_are_validated(tmp_path):
    result = run_cli("train", "--data", TINY_SYNTH, cwd=tmp_path, env={"CONVFORGE_FAULTS": "step@x:explode"})
    assert result.returncode != 0 and "CONVFORGE_FAULTS" in result.stderr
