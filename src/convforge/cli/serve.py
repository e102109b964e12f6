"""``convforge serve``: an HTTP inference server with dynamic batching for a checkpoint or an ONNX model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from convforge.cli.common import Command, add_model_source, add_runtime, load_source, runtime_device
from convforge.errors import ConfigError

DESCRIPTION = """\
Serve a checkpoint (PyTorch eager, or exported to ONNX Runtime fp32 or int8 on the fly) or an .onnx file written
by `convforge export`/`quantize` over HTTP, on 127.0.0.1 unless --host says otherwise:

  POST /v1/predict   images as the raw body (Content-Type image/*) or a multipart form: top-k classes as JSON;
                     segmentation masks and super-resolved images as PNG
  POST /v1/explain   the Grad-CAM overlay of one image as PNG (classifiers on --backend torch)
  GET  /v1/model     task, classes, input size, normalisation, preprocessing, metrics
  GET  /healthz, /readyz, /metrics (Prometheus), /  (a page to try it in a browser)

Requests arriving within --max-delay-ms run as one batch of up to --max-batch images; more than --max-queue
requests in flight are refused with 429 and Retry-After. SIGTERM or Ctrl-C: stop accepting, answer what is in
flight, exit 0.

  convforge serve runs/resnet20-*/best.safetensors --port 8000
  convforge serve model-int8.onnx --backend onnxruntime-int8 --threads 2
  curl -H 'Content-Type: image/jpeg' --data-binary @cat.jpg http://127.0.0.1:8000/v1/predict
"""


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from convforge.serve.backends import BACKENDS

    add_model_source(parser)
    parser.add_argument("--backend", default="torch", choices=BACKENDS,
                        help="torch (eager), onnxruntime (an .onnx file, or the checkpoint exported on start) or "
                             "onnxruntime-int8 (an int8 .onnx, or the checkpoint quantized on start with "
                             "--calib-data) (default: torch)")
    parser.add_argument("--calib-data", help="data spec whose train split calibrates --backend onnxruntime-int8 "
                                             "for a checkpoint")
    parser.add_argument("--calib-samples", type=int, default=512, help="calibration images (default: 512)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this "
                                                           "machine only; 0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    parser.add_argument("--max-delay-ms", type=float, default=5.0,
                        help="how long a batch waits for more images after its first (default: 5)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests in flight at once (reading, decoding, waiting, running); more get 429 "
                             "(default: 256)")
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="a request not answered within this many seconds gets 504 (default: 30)")
    parser.add_argument("--workers", type=int, default=1,
                        help="model worker threads, each running one batch at a time (default: 1)")
    parser.add_argument("--decode-threads", type=int, default=2, help="threads decoding images (default: 2)")
    parser.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body in MB; larger ones "
                                                                       "get 413; memory stays below about --max-queue "
                                                                       "times this (default: 8)")
    parser.add_argument("--max-images", type=int, default=64, help="images per request (default: 64)")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default: warning)")
    add_runtime(parser, batch_size=32, tta=False, batch_help="largest batch the model runs (alias --max-batch)")
    parser.add_argument("--max-batch", dest="batch_size", type=int, help="the same as --batch-size")


def _served(args: argparse.Namespace, device: str) -> Any:
    """The model the command line names, on its --backend."""
    from convforge.serve import load_served

    source = getattr(args, "source", None)
    if source is not None and str(source).endswith(".onnx"):
        if args.model or args.weights or args.calib_data:
            raise ConfigError("an .onnx file carries its own model and calibration: leave out --model, --weights "
                              "and --calib-data")
        return load_served(source, args.backend, threads=args.threads)
    loaded = load_source(args, device if args.backend == "torch" else "cpu")
    calibration = None
    if args.backend == "onnxruntime-int8" and args.calib_data:
        from convforge.cli.deploy import _calibration_images

        calibration, _ = _calibration_images(args.calib_data, loaded, args.calib_samples, loaded.input_size)
    return load_served(None, args.backend, loaded=loaded, calibration=calibration, threads=args.threads,
                       device=device)


def run_serve(args: argparse.Namespace) -> None:
    """``convforge serve``: load the model, serve it until SIGTERM or Ctrl-C."""
    from convforge.serve import Limits, ServeOptions, serve

    device = runtime_device(args)
    options = ServeOptions(max_batch=args.batch_size, max_delay_ms=args.max_delay_ms, max_queue=args.max_queue,
                           timeout_s=args.timeout_s, workers=args.workers, decode_threads=args.decode_threads,
                           limits=Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                                         max_images=args.max_images))
    options.check()
    served = _served(args, device)

    def announce(info: dict[str, Any]) -> None:
        model = info["model"]
        print(f"convforge serve: {model['name']} ({model['task']}, {model['backend']}) on {info['url']}  "
              f"[max batch {options.max_batch}, max delay {options.max_delay_ms:g} ms, max queue "
              f"{options.max_queue}]; SIGTERM or Ctrl-C stops it", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps(info), flush=True)

    try:
        serve(served, options, args.host, args.port, announce=announce, log_level=args.log_level)
    finally:
        served.close()
    print("convforge serve: stopped; every request in flight was answered", file=sys.stderr, flush=True)


COMMANDS = [
    Command("serve", "HTTP inference server with dynamic batching (FastAPI + uvicorn)", _add_serve_arguments,
            run_serve, DESCRIPTION, raw_description=True),
]
