"""Running the app with uvicorn: bind (localhost by default), announce the address once the model is warm, and
shut down gracefully on SIGTERM or Ctrl-C (stop accepting, answer every request in flight, exit 0)."""

from __future__ import annotations

import signal
import socket
import threading
from typing import Any, Callable

from convforge.errors import ConfigError, ConvforgeError
from convforge.serve.app import ServeOptions, create_app
from convforge.serve.backends import Served
from convforge.serve.errors import require_serve_extra


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); a ConfigError when taken. It listens from
    here on, so that clients told the address before uvicorn accepts are queued, not refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted sockets only then (else Nagle adds 40 ms to answers)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port (0: any free "
                          f"port) or --host") from None
    return sock


def address(sock: socket.socket) -> str:
    """The URL a bound socket serves."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(served: Served, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, *,
          announce: Callable[[dict[str, Any]], None] | None = None, log_level: str = "warning") -> None:
    """Serve until SIGTERM or Ctrl-C; ``announce`` gets the URL and the model's description once it is ready."""
    require_serve_extra()
    import uvicorn

    sock = bind(host, port)
    url = address(sock)

    def ready(state: Any) -> None:
        if announce is not None:
            announce({"url": url, "model": state.served.describe()})

    app = create_app(served, options, on_ready=ready)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main else None
    terminated: list[int] = []
    if in_main:
        # uvicorn raises the SIGTERM it handled again after its graceful shutdown: that must end in exit code 0
        signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if in_main and not terminated:  # after a SIGTERM, later ones (e.g. from a supervisor) are ignored too
            signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise ConvforgeError("the server did not start: see the error above")
