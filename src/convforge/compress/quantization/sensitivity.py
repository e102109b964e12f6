"""Per-layer sensitivity of an int8 model and mixed precision: which layers to keep in float.

Sensitivity of a layer (a convolution, linear, addition, multiplication or concatenation node of the ONNX
graph): the error of the network's output when that layer alone is quantized (its weights, its inputs and its
output activation, from the shared calibration ranges), relative to the float output on the same images:
mean((y_q - y)^2) / mean(y^2), also given as SQNR in dB. ``--max-drop P`` keeps the k most sensitive layers in
float (weights and the activations they read), k = 0, 1, 2, ... in ranking order, and stops at the first k whose
top-1 drop against the fp32 model is at most P points.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from convforge.compress.quantization.ptq import Prepared
from convforge.errors import ConfigError

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MERGING_OPS = ("Add", "Mul", "Concat")  # residual additions, gates, concatenations: int8 in ONNX Runtime too
SENSITIVITY_IMAGES = 128


def quantizable_nodes(path: str | Path) -> list[dict[str, str]]:
    """The layers of an ONNX model that int8 can be kept from, in graph order: convolution and linear nodes
    with a constant weight (``layer``: the PyTorch module, from the weight's name) and additions,
    multiplications and concatenations (``layer``: the module that holds them and the op, e.g.
    ``layer1.0 (Add)``); each ``{"node": ONNX node name, "op": type, "layer": ...}``."""
    import onnx

    graph = onnx.load(str(path)).graph
    constants = {init.name for init in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in constants:
            weight = node.input[1]
            layer = weight[: -len(".weight")] if weight.endswith(".weight") else node.name
        elif node.op_type in MERGING_OPS:
            parts = [p for p in node.name.split("/") if p]
            layer = f"{parts[-2] if len(parts) > 1 else 'model'} ({node.op_type})"
        else:
            continue
        nodes.append({"node": node.name, "op": node.op_type, "layer": layer})
    return nodes


def relative_error(reference: np.ndarray, output: np.ndarray) -> float:
    """mean((output - reference)^2) / mean(reference^2)."""
    signal = float(np.mean(np.square(reference, dtype=np.float64)))
    return float(np.mean(np.square(output - reference, dtype=np.float64))) / max(signal, 1e-30)


def _outputs(path: Path, inputs: np.ndarray, threads: int | None) -> np.ndarray:
    from convforge.export.onnx import run_session, session

    sess = session(path, threads)
    return np.concatenate([run_session(sess, inputs[i:i + 64]) for i in range(0, len(inputs), 64)])


def rank_layers(prepared: Prepared, inputs: np.ndarray, workdir: str | Path, *, threads: int | None = None,
                log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every quantizable layer, most sensitive first: ``node``, ``op``, ``layer``, ``error`` (relative output
    error with that layer alone quantized) and ``sqnr_db``, on ``inputs`` (normalised images)."""
    reference = _outputs(prepared.fp32_path, inputs, threads)
    rows = []
    nodes = quantizable_nodes(prepared.source)
    for i, row in enumerate(nodes):
        single = prepared.quantize(Path(workdir) / "single.onnx", only=[row["node"]])
        error = relative_error(reference, _outputs(single, inputs, threads))
        rows.append({**row, "error": error, "sqnr_db": 10 * math.log10(1 / error) if error > 0 else math.inf})
        if log:
            log(f"sensitivity {i + 1}/{len(nodes)}: {row['layer']} {error:.3g}")
    return sorted(rows, key=lambda r: -r["error"])


def fewest_float_layers(ranked: Sequence[dict[str, Any]], build: Callable[[list[str]], Path],
                        evaluate: Callable[[Path], float], fp32_top1: float, max_drop: float,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Keep the ``k`` most sensitive layers of ``ranked`` in float for k = 0, 1, ..., stopping at the first
    whose drop (``fp32_top1 - evaluate(build(excluded))``, points) is within ``max_drop``.

    Returns ``float_layers`` (layer and node names), ``top1_int8``, ``drop``, ``met`` and every ``trial``."""
    if max_drop < 0:
        raise ConfigError(f"--max-drop must be >= 0 points, got {max_drop:g}")
    trials = []
    for k in range(len(ranked) + 1):
        excluded = [r["node"] for r in ranked[:k]]
        top1 = evaluate(build(excluded))
        trials.append({"float_layers": k, "top1_int8": top1, "drop": fp32_top1 - top1})
        if log:
            log(f"--max-drop: {k} layer(s) in float, top-1 {top1:.2f}% (drop {fp32_top1 - top1:+.2f} points)")
        if fp32_top1 - top1 <= max_drop:
            break
    last = trials[-1]
    kept = list(ranked[: last["float_layers"]])
    return {"max_drop": max_drop, "fp32_top1": fp32_top1, "met": last["drop"] <= max_drop,
            "float_layers": [{"layer": r["layer"], "node": r["node"]} for r in kept],
            "top1_int8": last["top1_int8"], "drop": last["drop"], "trials": trials}


def keep_in_float(inputs: np.ndarray, *, max_drop: float | None = None, evaluate: Callable[[Path], float] | None = None,
                  threads: int | None = None, log: Callable[[str], None] | None = None
                  ) -> Callable[[Prepared, Path], dict[str, Any]]:
    """A ``then`` step for :func:`convforge.compress.quantization.ptq.quantize_model`: rank the layers on
    ``inputs`` (the first :data:`SENSITIVITY_IMAGES`); with ``max_drop``, also search the fewest float layers
    with ``evaluate(onnx path) -> top-1`` and rewrite the int8 model with them."""
    if max_drop is not None and evaluate is None:
        raise ConfigError("--max-drop needs labelled evaluation data (--data) to measure the drop")

    def step(prepared: Prepared, path: Path) -> dict[str, Any]:
        workdir = prepared.cache.parent
        ranked = rank_layers(prepared, inputs[:SENSITIVITY_IMAGES], workdir, threads=threads, log=log)
        out: dict[str, Any] = {"sensitivity": {"images": min(len(inputs), SENSITIVITY_IMAGES), "layers": ranked}}
        if max_drop is None:
            return out
        fp32_top1 = evaluate(prepared.fp32_path)
        search = fewest_float_layers(ranked, lambda excluded: prepared.quantize(workdir / "trial.onnx",
                                                                                exclude=excluded),
                                     evaluate, fp32_top1, max_drop, log)
        prepared.quantize(path, exclude=[r["node"] for r in search["float_layers"]])
        return {**out, "mixed_precision": search}

    return step
