"""Load test of ``convforge serve`` on 127.0.0.1: dynamic batching on vs off, overload, recovery, correctness.

For each model (ResNet-20 int8 on ONNX Runtime with 32x32 CIFAR-10-JPEG test images, reference weights; ResNet-18
at 224 px, random init, PyTorch eager, with Imagewoof photos):

1. A server with batching (``--max-batch 32``) and ``--max-queue`` = the clients: N clients, each sending one
   image at a time as fast as answers come, for T seconds: throughput, p50/p95/p99 latency, errors, lost requests.
2. Overload on the same server: 2N clients (more than the queue holds) for T/2 s: 429s, the server's RSS; a
   refused client waits 50-150 ms and sends again.
3. Recovery: N clients again for T/2 s: the throughput of step 1 again?
4. The same as step 1 on a server without batching (``--max-batch 1``).

Every answer is checked against the offline prediction for that image (ONNX Runtime or ``convforge predict`` one
image at a time); every request must be answered (a request without an answer is "lost"); the server's own
request counters must equal the client's; each server is stopped with SIGTERM and must exit 0.

    python benchmarks/serve_load.py [--clients 64] [--seconds 60] [--threads 2] [--smoke] [--no-record]

``--smoke``: the 32x32 model only, random weights and random images, 1 s phases, 4 clients (a few seconds; what
the test suite runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, extracted, record  # noqa: E402

CIFAR_MEAN, CIFAR_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # the reference weights' normalisation
TOLERANCE = 1e-4  # probabilities of a batched answer vs the offline one (float summation order differs)


@dataclass
class Target:
    """A model to serve: `convforge serve` arguments, request bodies and the offline probabilities of each."""

    name: str
    serve_args: list[str]
    bodies: list[bytes]
    kind: str
    expected: np.ndarray  # (images, classes) offline probabilities


@dataclass
class Phase:
    """What the clients saw in one phase."""

    name: str
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    mismatches: int = 0
    lost: int = 0
    sent: int = 0
    rss_mb: list[float] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def row(self) -> str:
        p50, p95, p99 = (np.percentile(self.latencies, q) * 1000 if self.latencies else float("nan")
                         for q in (50, 95, 99))
        errors = sum(n for s, n in self.statuses.items() if s != 200 and s != 429)
        return (f"| {self.name} | {self.clients} | {self.ok / self.seconds:.1f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | "
                f"{self.statuses.get(429, 0)} | {errors} | {self.lost} | {self.mismatches} | "
                f"{max(self.rss_mb, default=0):.0f} |")


# ---------------------------------------------------------------- the models and their offline answers


def offline_onnx(path: Path, images: list[Path], mean, std) -> np.ndarray:
    """Probabilities of an ONNX classifier for each image file, decoded as `convforge predict` does, one at a time."""
    import torch

    from convforge.data import normalize
    from convforge.export.onnx import run_session, session
    from convforge.train.inference import load_images

    sess = session(path, 1)
    rows = [torch.from_numpy(run_session(sess, normalize(view[None], mean, std))).softmax(1)[0]
            for view in load_images(images, (32, 32), 3)]
    return torch.stack(rows).numpy()


def resnet20_int8(workdir: Path, smoke: bool, count: int) -> Target:
    """ResNet-20 (reference weights; random in smoke mode) quantized to int8, and CIFAR-10-JPEG test images."""
    import torch

    from convforge.data import normalize
    from convforge.export import quantize_int8
    from convforge.train.inference import load_images, load_model

    if smoke:
        images = _random_images(workdir / "images32", count, (32, 32), ".png")
        loaded = load_model("resnet20", mean=CIFAR_MEAN, std=CIFAR_STD)
        calibration = torch.randn((32, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    else:
        data = extracted("cifar10-jpeg.tar.gz", "cifar10-jpeg")
        classes = sorted(p.name for p in (data / "test").iterdir())
        images = _round_robin(data / "test", classes, count)
        loaded = load_model(model="resnet20", weights=str(SHARED / "reference-weights" / "resnet20-12fca82f.th"),
                            mean=CIFAR_MEAN, std=CIFAR_STD, classes=classes, num_classes=10)
        train = _round_robin(data / "train", classes, 256)
        calibration = normalize(torch.stack(load_images(train, (32, 32), 3)), CIFAR_MEAN, CIFAR_STD)
    path = workdir / "resnet20-int8.onnx"
    quantize_int8(loaded.model, path, loaded.input_size, calibration, meta=dict(loaded.meta))
    return Target("ResNet-20 int8 (onnxruntime-int8), 32x32", [str(path), "--backend", "onnxruntime-int8"],
                  [p.read_bytes() for p in images], "image/png" if smoke else "image/jpeg",
                  offline_onnx(path, images, CIFAR_MEAN, CIFAR_STD))


def resnet18_224(workdir: Path, count: int) -> Target:
    """ResNet-18 (random init, seed 0) at 224 px in PyTorch, and Imagewoof validation photos."""
    import torch

    from convforge.train.inference import load_model, predict

    data = extracted("imagewoof2-160.tar.gz", "imagewoof2-160")
    classes = sorted(p.name for p in (data / "val").iterdir())
    images = _round_robin(data / "val", classes, count)
    norm = ["--mean", *map(str, CIFAR_MEAN), "--std", *map(str, CIFAR_STD)]
    loaded = load_model("resnet18", num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD)
    expected = torch.stack([torch.tensor([e["probability"] for e in sorted(item["top"], key=lambda e: e["index"])])
                            for path in images for item in predict(loaded, [path], top_k=10)]).numpy()
    return Target("ResNet-18 (torch, random init), 224 px", ["resnet18", "--num-classes", "10", *norm],
                  [p.read_bytes() for p in images], "image/jpeg", expected)


def _round_robin(root: Path, classes: list[str], count: int) -> list[Path]:
    files = [sorted((root / name).iterdir()) for name in classes]
    return [files[i % len(files)][i // len(files)] for i in range(count)]


def _random_images(folder: Path, count: int, size: tuple[int, int], suffix: str) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"{i}{suffix}" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return paths


# ---------------------------------------------------------------- the server process


class Server:
    """``convforge serve`` as a subprocess on a free port; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(self, args: list[str]) -> None:
        command = [sys.executable, "-m", "convforge", "serve", *args, "--port", "0", "--json"]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
        deadline = time.monotonic() + 600
        while not select.select([self.proc.stdout], [], [], 1.0)[0]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {' '.join(command)}")
        self.url = json.loads(self.proc.stdout.readline())["url"]
        self.host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def answered(self) -> int:
        """Prediction requests the server says it answered (any status), from its /metrics."""
        from urllib.request import urlopen

        text = urlopen(f"{self.url}/metrics", timeout=30).read().decode()
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith('convforge_serve_requests_total{endpoint="/v1/predict"')))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


# ---------------------------------------------------------------- the load client


class _Unanswered(ConnectionError):
    """The connection failed before any byte of an answer arrived."""


class Connection:
    """One keep-alive HTTP/1.1 connection. Hand-written on asyncio streams: the load client must cost the 2-core
    machine as little CPU as possible, so that the figures measure the server, not the client."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, kind: str) -> tuple[int, bytes]:
        """Status and body of one POST; a kept-alive connection the server had closed before this request (no
        byte of an answer came) is replaced and the request sent once more, as HTTP clients do."""
        reused = self.writer is not None
        try:
            return await self._post(path, body, kind)
        except _Unanswered:
            self.close()
            if not reused:
                raise
            return await self._post(path, body, kind)

    async def _post(self, path: str, body: bytes, kind: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            self.writer.write(head + body)
            await self.writer.drain()
            status_line = await self.reader.readline()
        except (ConnectionError, OSError) as exc:
            raise _Unanswered(str(exc)) from None
        if not status_line:
            raise _Unanswered("the server closed the connection")
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(status_line.split()[1]), payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def matches(payload: bytes, expected: np.ndarray) -> bool:
    """Whether an answer's top classes and probabilities are the offline ones (a near tie may swap the order)."""
    top = json.loads(payload)["predictions"][0]["top"]
    best = float(expected.max())
    return (all(abs(entry["probability"] - expected[entry["index"]]) <= TOLERANCE for entry in top)
            and expected[top[0]["index"]] >= best - TOLERANCE)


async def client(server: Server, target: Target, phase: Phase, start: int, stop_at: float) -> None:
    """Send images one after the other until ``stop_at``, then wait for the last answer; count everything."""
    connection = Connection(server.host, server.port)
    i = start
    while time.perf_counter() < stop_at:
        index = i % len(target.bodies)
        i += 1
        phase.sent += 1
        began = time.perf_counter()
        try:
            status, payload = await asyncio.wait_for(
                connection.post("/v1/predict?top_k=3", target.bodies[index], target.kind), 120)
        except (OSError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            phase.lost += 1
            connection.close()
            continue
        phase.statuses[status] = phase.statuses.get(status, 0) + 1
        if status == 200:
            phase.latencies.append(time.perf_counter() - began)
            phase.mismatches += not matches(payload, target.expected[index])
        elif status == 429:  # refused: back off briefly (not the full Retry-After, to keep the pressure on)
            await asyncio.sleep(0.05 + 0.1 * ((i * 7919) % 100) / 100)
    connection.close()


async def run_phase(server: Server, target: Target, name: str, clients: int, seconds: float) -> Phase:
    """``clients`` concurrent clients for ``seconds``, the server's RSS sampled every 0.25 s."""
    phase = Phase(name, clients)
    began = time.perf_counter()
    stop_at = began + seconds
    tasks = [asyncio.create_task(client(server, target, phase, k * 7, stop_at)) for k in range(clients)]
    while not all(task.done() for task in tasks):
        phase.rss_mb.append(server.rss_mb())
        await asyncio.sleep(0.25)
    await asyncio.gather(*tasks)
    phase.seconds = time.perf_counter() - began
    print(phase.row(), flush=True)
    return phase


# ---------------------------------------------------------------- the run


def load_test(target: Target, clients: int, seconds: float, threads: int) -> tuple[list[Phase], list[str]]:
    """The four phases on two servers; the checks of each server (answered = sent, exit code 0)."""
    common = ["--threads", str(threads), "--max-queue", str(clients), "--max-delay-ms", "5", "--timeout-s", "120"]
    phases, checks = [], []
    for batch, steps in ((32, (("batching on", 1, 1.0), ("overload", 2, 0.5), ("recovery", 1, 0.5))),
                         (1, (("batching off", 1, 1.0),))):
        server = Server([*target.serve_args, "--max-batch", str(batch), *common])
        mine = [asyncio.run(run_phase(server, target, name, clients * k, seconds * f)) for name, k, f in steps]
        answered = server.answered()
        code = server.stop()
        sent = sum(p.sent - p.lost for p in mine)
        checks.append(f"max batch {batch}: the server answered {answered} prediction requests, the clients got "
                      f"{sent} answers ({sum(p.lost for p in mine)} lost); SIGTERM -> exit code {code}")
        phases += mine
    return phases, checks


def report(target: Target, phases: list[Phase], checks: list[str]) -> list[str]:
    by = {p.name: p for p in phases}
    speedup = (by["batching on"].ok / by["batching on"].seconds) / max(by["batching off"].ok / by["batching off"].seconds, 1e-9)
    recovery = (by["recovery"].ok / by["recovery"].seconds) / max(by["batching on"].ok / by["batching on"].seconds, 1e-9)
    bad = sum(p.lost + p.mismatches + sum(n for s, n in p.statuses.items() if s >= 500) for p in phases)
    return [f"#### {target.name}", "",
            "| phase | clients | answers/s | p50 ms | p95 ms | p99 ms | 429s | other errors | lost | wrong answers | "
            "max RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *(p.row() for p in phases), "",
            f"Batching on / off throughput: {speedup:.2f}x; recovery after overload: {100 * recovery:.0f}% of the "
            f"throughput before it; 5xx + lost + wrong answers: {bad}.", *(f"- {c}" for c in checks), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients of the steady phases")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of a steady phase")
    parser.add_argument("--threads", type=int, default=2, help="the server's model threads (--threads)")
    parser.add_argument("--images", type=int, default=512, help="distinct images sent, in turn")
    parser.add_argument("--smoke", action="store_true", help="32x32 model only, random weights, 1 s, 4 clients")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.seconds, args.images = min(args.clients, 4), min(args.seconds, 1.0), min(args.images, 8)
    lines, failed = [], False
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        targets = [resnet20_int8(Path(tmp), args.smoke, args.images)]
        if not args.smoke:
            targets.append(resnet18_224(Path(tmp), min(args.images, 128)))
        for target in targets:
            print(f"\n{target.name}: {args.clients} clients, {args.seconds:g} s", flush=True)
            phases, checks = load_test(target, args.clients, args.seconds, args.threads)
            lines += report(target, phases, checks)
            failed |= any(p.lost or p.mismatches or any(s >= 500 for s in p.statuses) for p in phases)
            failed |= any(not c.endswith("exit code 0") for c in checks)
    lines.append(f"Command: `python benchmarks/serve_load.py --clients {args.clients} --seconds {args.seconds:g} "
                 f"--threads {args.threads}`{' --smoke' if args.smoke else ''}; loopback only, client and server on "
                 f"the same {os.cpu_count()} cores.")
    record("convforge serve under load: dynamic batching, overload, recovery", lines,
           save=not args.no_record and not args.smoke)
    if failed:
        raise SystemExit("FAILED: lost requests, wrong answers, 5xx or an unclean exit (see above)")


if __name__ == "__main__":
    main()
