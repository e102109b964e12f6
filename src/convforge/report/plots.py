"""Figures of the report, drawn with matplotlib's Agg canvas (no pyplot, no global state) into PNG bytes."""

from __future__ import annotations

import math
from typing import Any, Sequence

from convforge.figures import figure_png as to_png
from convforge.figures import new_figure as _figure

SPLIT_STYLE = {"train": "-", "val": ":", "test": "--"}
SPLIT_COLOR = {"train": "#1f77b4", "val": "#2ca02c", "test": "#d62728"}


def _finite(values: Sequence[Any]) -> bool:
    return any(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(r["epoch"])
            ys.append(value)
    return xs, ys


PRIMARY_TITLES = {"top1": "top-1 accuracy (%)", "miou": "mIoU (%)", "psnr": "PSNR (dB)"}


def learning_curves(runs: list[tuple[str, list[dict[str, Any]]]], primary: str = "top1") -> bytes | None:
    """Loss, the task's metric (``top1``, ``miou``, ``psnr``) and learning rate against epoch. One run:
    colour per split; several: colour per run and line style per split (train solid, val dotted, test dashed)."""
    runs = [(label, records) for label, records in runs if records]
    if not runs:
        return None
    fig = _figure(10.5, 3.4)
    axes = fig.subplots(1, 3)
    panels = (("loss", "loss"), (primary, PRIMARY_TITLES.get(primary, primary)), ("lr", "learning rate"))
    extra_splits = sorted({key[: -len(primary) - 1] for _, records in runs for r in records for key in r
                           if key.endswith(f"_{primary}") and key[: -len(primary) - 1] not in ("train", "val", "test")})
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (metric, title) in zip(axes, panels):
        for (label, records), color in zip(runs, colors):
            splits = ("",) if metric == "lr" else ("train", "val", "test", *extra_splits)
            for split in splits:
                xs, ys = _series(records, f"{split}_{metric}" if split else metric)
                if not xs:
                    continue
                if len(runs) == 1:
                    name = split or metric
                    style = dict(color=SPLIT_COLOR.get(split, "#1f77b4"), linestyle="-")
                else:
                    name = f"{label} {split}".strip()
                    style = dict(color=color, linestyle=SPLIT_STYLE.get(split, "-"))
                ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, label=name, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if metric == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if ax.get_legend_handles_labels()[0] and (len(runs) == 1 or metric == primary):
            ax.legend(fontsize=7 if len(runs) > 1 else 8)
    return to_png(fig)


def confusion_matrix(confusion: list[list[int]], classes: list[str]) -> bytes:
    """Heat map of the confusion matrix, coloured by the share of each true class (rows)."""
    import numpy as np

    matrix = np.asarray(confusion, dtype=float)
    n = len(classes)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(6.5, max(3.2, 0.3 * n + 2.0))
    fig = _figure(size + 0.9, size)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 30:
        short = [c if len(c) <= 12 else c[:11] + "\u2026" for c in classes]
        ax.set_xticks(range(n), short, rotation=90 if n > 6 else 0, fontsize=8)
        ax.set_yticks(range(n), short, fontsize=8)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return to_png(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point beats on both latency (lower) and accuracy (higher),
    sorted by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def accuracy_latency(labels: list[str], latencies: list[float], accuracies: list[float], xlabel: str) -> bytes:
    """Scatter of accuracy against latency with the Pareto front drawn as a step line."""
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    points = list(zip(latencies, accuracies))
    front = pareto_front(points)
    on_front = set(front)
    for i, (label, (x, y)) in enumerate(zip(labels, points)):
        ax.scatter([x], [y], s=40, color="#d62728" if i in on_front else "#7f7f7f", zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if len(front) > 1:
        ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="#d62728",
                alpha=0.6, label="Pareto front")
        ax.legend(fontsize=8, loc="lower right")
    if max(latencies) > 20 * max(min(latencies), 1e-12):
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    return to_png(fig)


def depth_curves(rows: list[dict[str, Any]], depth_key: str, metrics: list[str], title: str) -> bytes | None:
    """Filter metrics against (normalised) depth, one panel per metric (at most six)."""
    metrics = [m for m in metrics if _finite([r.get(m) for r in rows])][:6]
    if not metrics:
        return None
    columns = min(3, len(metrics))
    lines = math.ceil(len(metrics) / columns)
    fig = _figure(10.5, 2.8 * lines)
    axes = fig.subplots(lines, columns, squeeze=False).flatten()
    for ax, metric in zip(axes, metrics):
        pairs = sorted((r[depth_key], r[metric]) for r in rows
                       if isinstance(r.get(depth_key), (int, float)) and isinstance(r.get(metric), (int, float))
                       and not isinstance(r.get(metric), bool) and math.isfinite(r[metric]))
        ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", markersize=3)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(depth_key, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return to_png(fig)


def accuracy_eps(lines: dict[str, list[tuple[float, float]]], clean: float | None, title: str) -> bytes | None:
    """Robust accuracy against eps (finite points), one line per attack, each from the clean accuracy at eps 0."""
    lines = {label: points for label, points in lines.items() if points}
    if not lines:
        return None
    fig = _figure(5.5, 3.8)
    ax = fig.subplots()
    for label, points in lines.items():
        points = sorted(([(0.0, clean)] if clean is not None else []) + points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("eps (pixels on [0, 1])")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return to_png(fig)
