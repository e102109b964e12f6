"""Serving checkpoints and ONNX models over HTTP with dynamic batching (``convforge serve``).

The Python API::

    from convforge.serve import load_served, create_app, ServeOptions, serve

    served = load_served(None, "torch", loaded=load_model("run/best.safetensors"))
    serve(served, ServeOptions(max_batch=32, max_delay_ms=5), host="127.0.0.1", port=8000)

The client (standard library only): ``from convforge.serve.client import predict``. The HTTP stack (FastAPI,
uvicorn, python-multipart, prometheus_client) is the optional extra ``convforge[serve]``; it is imported only
when an app is created.
"""

from convforge.serve.app import ServeOptions, create_app
from convforge.serve.backends import BACKENDS, Served, load_served
from convforge.serve.limits import Limits
from convforge.serve.server import serve

__all__ = ["BACKENDS", "Limits", "ServeOptions", "Served", "create_app", "load_served", "serve"]
