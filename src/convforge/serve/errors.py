"""What the server answers instead of a prediction: an HTTP status, a stable code and a message that says what to do."""

from __future__ import annotations

from typing import Any


class ServeError(Exception):
    """A request the server refuses or could not answer; becomes a JSON body ``{"error": {...}}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}


def require_serve_extra() -> None:
    """Raise a ConfigError naming the install command when the ``serve`` extra is missing."""
    from convforge.errors import ConfigError

    from importlib.util import find_spec

    modules = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart",
               "prometheus_client": "prometheus_client"}
    missing = [package for module, package in modules.items() if find_spec(module) is None]
    if missing:
        raise ConfigError(f"convforge serve needs {', '.join(missing)}: pip install 'convforge[serve]' "
                          f"(or pip install {' '.join(missing)})")
