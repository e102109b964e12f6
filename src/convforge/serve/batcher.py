"""Dynamic batching: images that arrive within ``max_delay`` of each other run as one batch of up to ``max_batch``.

A collector task per model worker takes the first waiting image, then whatever else arrives until the batch is
full or ``max_delay`` has passed since the first one (Triton's ``max_queue_delay``), and runs the batch in its
worker thread, off the event loop. While a batch runs, new images queue up and form the next one, so the batches
grow with the load by themselves. The queue itself is bounded by the server's admission limit
(:class:`Admission`): requests over it are refused (429) before their bodies are read.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from convforge.serve.errors import ServeError
from convforge.serve.metrics import Metrics


@dataclass
class _Job:
    view: torch.Tensor
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects submitted views into batches for ``run_batch`` (views -> one output each) on ``workers`` threads."""

    def __init__(self, run_batch: Callable[[list[torch.Tensor]], list[Any]], metrics: Metrics, *,
                 max_batch: int = 32, max_delay_s: float = 0.005, workers: int = 1) -> None:
        self.run_batch = run_batch
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.workers = workers
        self._queue: asyncio.Queue[_Job] | None = None
        self._tasks: list[asyncio.Task] = []
        self._executor: ThreadPoolExecutor | None = None
        self._running = 0
        self.seconds_per_batch = 0.0  # running mean of the model time, for Retry-After estimates

    def depth(self) -> int:
        """Images waiting for a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Start the collectors on the running event loop."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="convforge-model")
        self._tasks = [asyncio.get_running_loop().create_task(self._collect()) for _ in range(self.workers)]

    async def warm_up(self, view: torch.Tensor) -> None:
        """Run one image through the model on a worker thread, unrecorded (first calls allocate and plan)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, [view])

    async def submit(self, views: list[torch.Tensor]) -> list[Any]:
        """The outputs of ``views``, each run in some batch; cancelled waits leave their jobs to be skipped."""
        if self._queue is None:
            raise ServeError(503, "not_ready", "the model is not loaded yet (or the server is shutting down)")
        loop = asyncio.get_running_loop()
        jobs = [_Job(view, loop.create_future()) for view in views]
        for job in jobs:
            self._queue.put_nowait(job)
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        finally:
            for job in jobs:  # a timed-out request: its jobs still queued are skipped by the collector
                if not job.future.done():
                    job.future.cancel()

    async def close(self) -> None:
        """Finish every queued and running batch, then stop the collectors and the worker threads."""
        while self._queue is not None and (self._queue.qsize() or self._running):
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._queue, self._tasks, self._executor = None, [], None

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            self._running += 1
            try:
                deadline = loop.time() + self.max_delay_s
                while len(batch) < self.max_batch:
                    if not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                        continue
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except asyncio.TimeoutError:
                        break
                live = [job for job in batch if not job.future.done()]
                if live:
                    await self._run(live)
            finally:
                self._running -= 1

    async def _run(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        waits = [start - job.queued for job in jobs]
        try:
            outputs = await loop.run_in_executor(self._executor, self.run_batch, [job.view for job in jobs])
        except Exception as exc:  # noqa: BLE001 - every request of the batch learns why
            error = ServeError(500, "model_failed", f"the model failed on a batch of {len(jobs)}: "
                                                    f"{type(exc).__name__}: {exc}")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        seconds = time.perf_counter() - start
        self.seconds_per_batch = seconds if not self.seconds_per_batch else 0.9 * self.seconds_per_batch + 0.1 * seconds
        self.metrics.batch(len(jobs), waits, seconds)
        for job, output in zip(jobs, outputs):
            if not job.future.done():
                job.future.set_result(output)


class Admission:
    """At most ``limit`` prediction requests at once (being read, decoded, waiting or running); the next one
    gets 429 with a Retry-After estimated from the model time per batch."""

    def __init__(self, limit: int, batcher: Batcher) -> None:
        self.limit = limit
        self.batcher = batcher
        self.count = 0

    def enter(self) -> None:
        """Admit one request, or raise the 429."""
        if self.count >= self.limit:
            batches = math.ceil(self.count / max(1, self.batcher.max_batch * self.batcher.workers))
            retry = max(1, math.ceil(batches * self.batcher.seconds_per_batch))
            raise ServeError(429, "queue_full", f"the server is at its limit of {self.limit} requests in flight "
                                                f"(--max-queue); retry after {retry} s",
                             {"Retry-After": str(retry)})
        self.count += 1

    def leave(self) -> None:
        """One admitted request is answered."""
        self.count -= 1
