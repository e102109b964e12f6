"""The server's Prometheus metrics (``GET /metrics``, text format 0.0.4), kept in one registry per app.

prometheus_client (pure Python, no dependencies) writes the exposition format, so scrapers and its own
parser read it as they read any other exporter.
"""

from __future__ import annotations

from typing import Callable

PREFIX = "convforge_serve"
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests by endpoint and status, errors by code, images, batch sizes, queue wait, model time per
    batch, request latency, requests in flight and images waiting for a batch."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        reg = {"registry": self.registry}
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], **reg)
        self.errors = Counter(f"{PREFIX}_errors", "Requests answered with an error, by error code", ["code"], **reg)
        self.images = Counter(f"{PREFIX}_images", "Images run through the model", **reg)
        self.batches = Histogram(f"{PREFIX}_batch_size", "Images per model batch", buckets=BATCH_SIZES, **reg)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time an image waited for its batch",
                                    buckets=SECONDS, **reg)
        self.batch_time = Histogram(f"{PREFIX}_batch_seconds", "Model time per batch", buckets=SECONDS, **reg)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds", "Time from a request's arrival to its "
                                 "answer, by endpoint", ["endpoint"], buckets=SECONDS, **reg)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "Prediction requests admitted and not answered", **reg)
        depth = Gauge(f"{PREFIX}_queue_depth", "Images waiting for a batch", **reg)
        depth.set_function(queue_depth)

    def batch(self, size: int, waits: list[float], seconds: float) -> None:
        """Record one model batch: its size, each image's queue wait and the model time."""
        self.batches.observe(size)
        self.images.inc(size)
        self.batch_time.observe(seconds)
        for wait in waits:
            self.queue_wait.observe(wait)

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
