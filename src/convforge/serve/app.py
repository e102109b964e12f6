"""The HTTP application (FastAPI on Starlette): predictions, explanations, the model's self-description, health,
readiness, metrics and the browser page.

``POST /v1/predict`` reads the body (size-limited), decodes each image in a bounded thread pool off the event
loop, hands the views to the dynamic batcher and answers top-k JSON (classify) or PNG (segment, super-resolve).
Requests over ``max_queue`` in flight get 429 with Retry-After before their bodies are read; a request not
answered within ``timeout_s`` gets 504. Every refusal is a JSON ``{"error": {status, code, message}}``.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations (Request).
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from convforge.errors import ConfigError
from convforge.serve.backends import Served
from convforge.serve.batcher import Admission, Batcher
from convforge.serve.errors import ServeError, require_serve_extra
from convforge.serve.explain import Explainer
from convforge.serve.limits import Limits
from convforge.serve.metrics import CONTENT_TYPE, Metrics
from convforge.serve.preprocess import Preprocessor, scratch_dir
from convforge.serve.responses import predictions, single_picture
from convforge.serve.uploads import read_uploads

ENDPOINTS = ("/", "/healthz", "/readyz", "/metrics", "/v1/model", "/v1/predict", "/v1/explain")


@dataclass(frozen=True)
class ServeOptions:
    """How the server batches and what it admits (``convforge serve`` options of the same names)."""

    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256
    timeout_s: float = 30.0
    workers: int = 1
    decode_threads: int = 2
    limits: Limits = field(default_factory=Limits)

    def check(self) -> None:
        """A ConfigError naming the first option out of range."""
        for name, value, low in (("--max-batch", self.max_batch, 1), ("--max-queue", self.max_queue, 1),
                                 ("--workers", self.workers, 1), ("--max-delay-ms", self.max_delay_ms, 0),
                                 ("--timeout-s", self.timeout_s, 0.001), ("--decode-threads", self.decode_threads, 1),
                                 ("--max-images", self.limits.max_images, 1),
                                 ("the body limit in bytes (--max-body-mb)", self.limits.max_body_bytes, 1)):
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")


class ServerState:
    """The served model and everything the endpoints share: batcher, admission, metrics, decoding pool."""

    def __init__(self, served: Served, options: ServeOptions) -> None:
        options.check()
        self.served = served
        self.options = options
        self.metrics = Metrics(lambda: self.batcher.depth())
        self.batcher = Batcher(served.run_batch, self.metrics, max_batch=options.max_batch,
                               max_delay_s=options.max_delay_ms / 1000.0, workers=options.workers)
        self.admission = Admission(options.max_queue, self.batcher)
        self.explainer = Explainer(served)
        self.ready = False
        self.scratch = scratch_dir()
        self.preprocessor = Preprocessor(served.meta, options.limits, self.scratch.name)
        self.decode_pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the batcher and the decoding pool, run one warm-up batch, then report ready."""
        import torch

        self.decode_pool = ThreadPoolExecutor(self.options.decode_threads, thread_name_prefix="convforge-decode")
        self.batcher.start()
        await self.batcher.warm_up(torch.zeros(self.served.input_size, dtype=torch.uint8))
        self.ready = True

    async def stop(self) -> None:
        """Finish what is queued, then release the threads and the upload folder."""
        self.ready = False
        await self.batcher.close()
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=True)
        self.scratch.cleanup()

    async def admitted(self, work: Callable[[], Awaitable[Any]]) -> Any:
        """``work()`` within the admission limit and the per-request timeout."""
        self.admission.enter()
        self.metrics.in_flight.inc()
        try:
            return await asyncio.wait_for(work(), self.options.timeout_s)
        except asyncio.TimeoutError:
            raise ServeError(504, "timeout", f"no answer within {self.options.timeout_s:g} s (--timeout-s): the "
                                             f"server is overloaded or the images are too large") from None
        finally:
            self.admission.leave()
            self.metrics.in_flight.dec()

    async def views(self, request: Any) -> tuple[list[str], list[Any]]:
        """The names and model views of a request's images, decoded in the pool."""
        uploads = await read_uploads(request, self.options.limits)
        loop = asyncio.get_running_loop()
        views = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, self.preprocessor, data, name)
                                       for name, data in uploads))
        return [name for name, _ in uploads], list(views)

    async def predict(self, request: Any) -> Any:
        """``POST /v1/predict``."""
        from fastapi.responses import JSONResponse, Response

        top_k = _int_param(request, "top_k", 5, 1, max(1, len(self.served.classes)))
        answer = request.query_params.get("format", "auto")
        if answer not in ("auto", "json"):
            raise ServeError(400, "bad_parameter", f"format={answer!r}: use json (or leave it out)")
        names, views = await self.views(request)
        outputs = await self.batcher.submit(views)
        if self.served.task != "classify" and len(outputs) == 1 and answer == "auto":
            body, headers = single_picture(self.served, outputs[0])
            return Response(body, media_type="image/png", headers=headers)
        return JSONResponse(predictions(self.served, names, outputs, top_k))

    async def explain(self, request: Any) -> Any:
        """``POST /v1/explain``: the Grad-CAM overlay of one image as PNG (class in ``X-Class``)."""
        from fastapi.responses import Response

        self.explainer.check()
        target = _int_param(request, "target", -1, -1, len(self.served.classes) - 1)
        names, views = await self.views(request)
        if len(views) != 1:
            raise ServeError(400, "one_image", f"explain takes one image, got {len(views)}")
        loop = asyncio.get_running_loop()
        body, shown = await loop.run_in_executor(self.decode_pool, self.explainer, views[0],
                                                 None if target < 0 else target)
        return Response(body, media_type="image/png", headers={"X-Class": shown["class"],
                                                               "X-Class-Index": str(shown["index"])})


def _int_param(request: Any, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ServeError(400, "bad_parameter", f"{name}={raw!r}: expected an integer in {low}..{high}")
    return value


def create_app(served: Served, options: ServeOptions | None = None,
               on_ready: Callable[[ServerState], None] | None = None) -> Any:
    """The FastAPI app serving ``served``; ``on_ready`` runs once the model is warm (the app's state is
    ``app.state.serve``)."""
    require_serve_extra()
    from fastapi import FastAPI

    state = ServerState(served, options or ServeOptions())

    @asynccontextmanager
    async def lifespan(app: Any):
        await state.start()
        if on_ready is not None:
            on_ready(state)
        yield
        await state.stop()

    app = FastAPI(title="convforge serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.serve = state
    _add_routes(app, state)
    app.add_middleware(_Instrument, metrics=state.metrics)
    return app


def _add_routes(app: Any, state: ServerState) -> None:
    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    from convforge.serve.page import page_html

    async def refused(request: Request, exc: ServeError) -> JSONResponse:
        state.metrics.errors.labels(exc.code).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def failed(request: Request, exc: Exception) -> JSONResponse:
        return await refused(request, ServeError(500, "internal", f"{type(exc).__name__}: {exc}"))

    async def routing(request: Request, exc: HTTPException) -> JSONResponse:  # unknown path, wrong method
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return await refused(request, ServeError(exc.status_code, code, f"{request.method} {request.url.path}: "
                                                 f"{exc.detail}; endpoints: {', '.join(ENDPOINTS)}", exc.headers))

    app.add_exception_handler(ServeError, refused)
    app.add_exception_handler(HTTPException, routing)
    app.add_exception_handler(Exception, failed)

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        return await state.admitted(lambda: state.predict(request))

    @app.post("/v1/explain")
    async def explain(request: Request) -> Response:
        return await state.admitted(lambda: state.explain(request))

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        options = state.options
        return {**state.served.describe(), "server": {
            "max_batch": options.max_batch, "max_delay_ms": options.max_delay_ms, "max_queue": options.max_queue,
            "timeout_s": options.timeout_s, "workers": options.workers, "max_body_bytes": options.limits.max_body_bytes,
            "max_images": options.limits.max_images, "max_pixels": options.limits.max_pixels}}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body = {"ready": state.ready, "in_flight": state.admission.count, "queued_images": state.batcher.depth()}
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html())


class _Instrument:
    """ASGI middleware: counts every HTTP answer by endpoint and status and times it (unknown paths: "other")."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start = time.perf_counter()
        status = [500]

        async def record_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
