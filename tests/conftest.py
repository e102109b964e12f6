"""Shared fixtures: an isolated decoding cache for every test, and one small trained run for the session."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory):
    """Session-wide CONVFORGE_CACHE, so session fixtures never touch ~/.cache either."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("session-cache")
        mp.setenv("CONVFORGE_CACHE", str(cache))
        yield cache


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty CONVFORGE_CACHE for each test (also inherited by CLI subprocesses)."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("CONVFORGE_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _restore_process_state():
    """Undo process-wide side effects of train() and cli.main(): torch threads and the SIGTERM handler."""
    threads = torch.get_num_threads()
    handler = signal.getsignal(signal.SIGTERM)
    yield
    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The small CNN trained 3 epochs on scikit-learn digits; returns the summary, run dir and live model."""
    from convforge import TrainConfig, fit
    from convforge.train.tasks import base as tasks  # Task.build_model calls base.create_model

    captured = {}
    real_create = tasks.create_model

    def capture(*args, **kwargs):
        captured["model"] = real_create(*args, **kwargs)
        return captured["model"]

    run_dir = tmp_path_factory.mktemp("digits") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks, "create_model", capture)
        summary = fit(TrainConfig(model="smallcnn", data="digits", epochs=3, batch_size=64,
                                  model_args={"widths": [16, 32, 64]}, out=str(run_dir)), quiet=True)
    return {"summary": summary, "run_dir": run_dir, "model": captured["model"].eval()}
