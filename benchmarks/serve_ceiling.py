"""What dynamic batching can gain in `convforge serve` on this machine, measured without HTTP: the served
model's throughput at batch 1 against batch 32, and the server's per-upload preprocessing, on the two models of
serve_load.py.

A server that batches still decodes and preprocesses every upload on its own; only the model call is shared.
With ``pre`` the preprocessing time of one upload and ``m1``, ``m32`` the model time of a batch of 1 and of 32,
``m1 / (m32 / 32)`` is what the model gains from batching and ``(pre + m1) / (pre + m32 / 32)`` what is left of
it once preprocessing is counted. Per-request costs that are the same either way (HTTP parsing, JSON, the load
client) pull a server's ratio further towards 1; only the per-call overhead of batch-1 serving (a hand-off to
the model thread and back for every request) is saved by batching on top of these figures. Both are printed
per model, from the same Served objects and Preprocessor the server runs, timed in interleaved rounds (p50 over
--rounds).

    python benchmarks/serve_ceiling.py [--threads 2] [--rounds 15] [--smoke] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402
from serve_load import CIFAR_MEAN, CIFAR_STD, resnet18_224, resnet20_int8  # noqa: E402

BATCH = 32


def served_models(workdir: Path, smoke: bool, threads: int) -> list[tuple[str, object, list[bytes]]]:
    """(name, Served, request bodies) of serve_load's targets, built as `convforge serve` builds them."""
    from convforge.serve.backends import onnx_served, torch_served
    from convforge.train.inference import load_model

    int8 = resnet20_int8(workdir, smoke, BATCH)
    models = [(int8.name, onnx_served(Path(int8.serve_args[0]), "onnxruntime-int8", threads), int8.bodies)]
    if not smoke:
        photos = resnet18_224(workdir, BATCH)
        loaded = load_model("resnet18", num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD)
        models.append((photos.name, torch_served(loaded), photos.bodies))
    return models


def ceiling(name: str, served, bodies: list[bytes], rounds: int, scratch: str) -> list[str]:
    """The table row of one model: per-upload preprocessing, model time per image at batch 1 and 32, ratios."""
    from convforge.measure.bench import time_fn
    from convforge.serve.limits import Limits
    from convforge.serve.preprocess import Preprocessor

    prepare = Preprocessor(served.meta, Limits(), scratch)
    views = [prepare(body, f"upload-{i}") for i, body in enumerate(bodies)]
    runs = {"pre": lambda: [prepare(body, "upload") for body in bodies],
            "m1": lambda: [served.run_batch([view]) for view in views],
            "m32": lambda: served.run_batch(views)}
    for fn in runs.values():
        time_fn(fn, warmup=1, repeats=0)
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):  # interleaved, so that other load hits all three alike
        for key, fn in runs.items():
            times[key] += time_fn(fn, warmup=0, repeats=1)
    pre, m1, m32 = (float(np.percentile(times[key], 50)) / len(views) for key in ("pre", "m1", "m32"))
    model_ratio, with_preprocessing = m1 / m32, (pre + m1) / (pre + m32)
    print(f"{name}: preprocess {pre * 1e3:.3f} ms/upload, model {m1 * 1e3:.3f} ms/image at batch 1, "
          f"{m32 * 1e3:.3f} ms/image at batch {BATCH}: model {model_ratio:.2f}x, with preprocessing "
          f"{with_preprocessing:.2f}x", flush=True)
    return [f"| {name} | {pre * 1e3:.3f} | {m1 * 1e3:.3f} ({1 / m1:.0f}/s) | {m32 * 1e3:.3f} ({1 / m32:.0f}/s) | "
            f"{model_ratio:.2f}x | {with_preprocessing:.2f}x |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="model threads, as `convforge serve --threads`")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="the 32x32 model only, random weights, 2 rounds")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rounds = 2 if args.smoke else args.rounds
    lines = [f"Per image, p50 of {rounds} interleaved rounds of {BATCH} images; threads={args.threads}.", "",
             f"| model | preprocess ms/upload | model ms/image, batch 1 | model ms/image, batch {BATCH} | "
             f"model batch {BATCH} / batch 1 | with preprocessing (pre + m1) / (pre + m{BATCH}/{BATCH}) |",
             "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="serve-ceiling-") as tmp:
        for name, served, bodies in served_models(Path(tmp), args.smoke, args.threads):
            lines += ceiling(name, served, bodies, rounds, tmp)
    lines += ["", "Per-request costs that batching does not share (HTTP parsing, JSON, the load client) pull a "
                  "server's batched / batch-1 ratio towards 1; only the per-call overhead of batch-1 serving (one "
                  "hand-off to the model thread per request) is saved on top of the model's own gain.",
              f"Command: `python benchmarks/serve_ceiling.py --threads {args.threads} --rounds {rounds}"
              f"{' --smoke' if args.smoke else ''}`; {os.cpu_count()} cores."]
    record("convforge serve: the ceiling of dynamic batching (no HTTP)", lines,
           save=not args.no_record and not args.smoke)


if __name__ == "__main__":
    main()
