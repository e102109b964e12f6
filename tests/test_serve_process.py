"""``convforge serve`` as a real process: SIGTERM with requests in flight answers them all and exits 0; command-line
errors; and the load-test benchmark in its smoke mode."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from helpers import REPO
from test_serve_helpers import assert_same_top, in_background, offline_top, tiny, wait_for  # noqa: F401 - tiny


def _start(*args: str, cwd) -> tuple[subprocess.Popen, str]:
    """``convforge serve ARGS --port 0 --json`` and the URL it announces once its model is warm."""
    proc = subprocess.Popen([sys.executable, "-m", "convforge", "serve", *args, "--port", "0", "--json"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not select.select([proc.stdout], [], [], 0.5)[0]:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"convforge serve did not start: {proc.communicate()[1][-2000:]}")
    return proc, json.loads(proc.stdout.readline())["url"]


def test_sigterm_with_requests_in_flight_answers_them_all_and_exits_0(tiny, tmp_path):
    count = 12
    images = tiny["images"]
    expected = offline_top(tiny["loaded"], images)
    # a batch waits up to 3 s for more images: the requests are still in flight when SIGTERM comes
    proc, url = _start(str(tiny["ckpt"]), "--max-delay-ms", "3000", "--max-batch", "64", "--threads", "1",
                       cwd=tmp_path)
    try:
        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=count + 2)) as client:
            threads, answers = in_background(lambda i: client.post(
                f"{url}/v1/predict", content=images[i % len(images)].read_bytes(),
                headers={"Content-Type": "image/png" if images[i % len(images)].suffix == ".png" else "image/jpeg"}),
                count)
            wait_for(lambda: client.get(f"{url}/readyz").json()["in_flight"] == count)
            proc.send_signal(signal.SIGTERM)
            host, port = url.removeprefix("http://").rsplit(":", 1)
            wait_for(lambda: _refused(host, int(port)), 20)  # it stops accepting ...
            assert sum(thread.is_alive() for thread in threads) > 0  # ... while requests are still in flight
            for thread in threads:
                thread.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert "every request in flight was answered" in stderr, stderr
    assert len(answers) == count
    for i, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        assert_same_top(answer.json()["predictions"][0]["top"], expected[i % len(images)])


def _refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except OSError:
        return True


def test_command_line_errors_are_clear(tiny, tmp_path, capsys):
    from convforge.cli import main

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not really")
    assert main(["serve", str(onnx), "--backend", "torch"]) == 2
    assert "--backend onnxruntime" in capsys.readouterr().err
    assert main(["serve", str(tiny["ckpt"]), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    assert main(["serve", str(onnx), "--backend", "onnxruntime"]) == 2
    assert "m.onnx.json" in capsys.readouterr().err  # no sidecar: it says which file is missing
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tiny["ckpt"]), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def run_benchmark_smoke(script: str, cwd) -> subprocess.CompletedProcess:
    """``benchmarks/SCRIPT --smoke --no-record`` in a subprocess; fails the test on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--no-record"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_the_load_test_benchmark_runs_in_smoke_mode(tmp_path):
    result = run_benchmark_smoke("serve_load.py", tmp_path)
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    by_phase = {cells[0].strip(): [cell.strip() for cell in cells] for cells in rows if cells[0].strip() != "phase"}
    assert set(by_phase) == {"batching on", "overload", "recovery", "batching off"}
    for name, cells in by_phase.items():
        assert float(cells[2]) > 0, name  # answers per second
        assert cells[8] == "0" and cells[9] == "0", name  # lost, wrong answers
    assert int(by_phase["overload"][6]) > 0  # 8 clients on a queue of 4: some requests refused with 429
    assert "SIGTERM -> exit code 0" in result.stdout


@pytest.mark.slow
def test_the_batching_ceiling_benchmark_runs_in_smoke_mode(tmp_path):
    result = run_benchmark_smoke("serve_ceiling.py", tmp_path)
    row = next(line for line in result.stdout.splitlines() if line.startswith("| ResNet-20"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    preprocess, model_ratio, with_pre = float(cells[1]), float(cells[4].rstrip("x")), float(cells[5].rstrip("x"))
    assert preprocess > 0 and model_ratio > 0
    assert min(model_ratio, 1.0) - 1e-9 <= with_pre <= max(model_ratio, 1.0) + 1e-9  # pulled towards 1
