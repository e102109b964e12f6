"""``convforge explain``: saliency maps of a classifier's predictions, as overlays, grids and explain.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from convforge.cli.common import Command, add_model_source, add_runtime, load_source, runtime_device
from convforge.errors import ConfigError, DataError

METHOD_HELP = "gradcam, gradcam++, fullgrad, ig (integrated gradients), occlusion"


def _add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--method", default="all", help=f"comma-separated saliency methods: {METHOD_HELP}; "
                                                        "or all (default: all)")
    parser.add_argument("--out", required=True, help="folder for the overlays, grids and explain.json")
    parser.add_argument("--target", metavar="CLASS", help="class name or index to explain (default: each image's "
                                                          "predicted class)")
    parser.add_argument("--layer", metavar="NAME", help="Grad-CAM layer, a dotted module name such as features.3 "
                                                        "(default: the last feature map before global pooling)")
    add_runtime(parser, tta=False, batch_help="images explained together; also the internal batch of ig and "
                                              "occlusion")


def model_views(loaded: Any, paths: Sequence[str]) -> list[Any]:
    """The uint8 (C, H, W) views of image files the model sees, decoded exactly as ``convforge predict`` does."""
    from convforge.train.inference import load_images

    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        raise DataError(f"image not found: {missing[0]}")
    channels, height, width = loaded.input_size
    preprocess = loaded.meta.get("preprocess")
    if preprocess:  # trained on image stores: the evaluation view (aspect kept, resize + centre crop)
        from convforge.data.photos import photo_view

        return [photo_view(path, preprocess, channels) for path in paths]
    return load_images(paths, (height, width), channels)


def class_index(classes: Sequence[str], target: str | None) -> int | None:
    """``--target`` as a class index: a class name, or an index in range."""
    if target is None:
        return None
    if target in classes:
        return list(classes).index(target)
    if target.lstrip("-").isdigit() and 0 <= int(target) < len(classes):
        return int(target)
    shown = ", ".join(classes[:30]) + (", ..." if len(classes) > 30 else "")
    raise ConfigError(f"--target {target!r} is neither a class name nor an index in 0..{len(classes) - 1}; "
                      f"classes: {shown}")


def _method_options(method: str, batch_size: int, images: int) -> dict[str, Any]:
    if method == "ig":
        return {"internal_batch_size": max(1, batch_size)}
    if method == "occlusion":
        return {"perturbations_per_eval": max(1, batch_size // max(1, images))}
    return {}


def _file_stems(paths: Sequence[str]) -> list[str]:
    stems: list[str] = []
    for i, path in enumerate(paths):
        stem = Path(path).stem
        stems.append(stem if stem not in stems else f"{stem}-{i}")
    return stems


def _saliency(loaded: Any, views: list[Any], methods: list[str], targets: list[int], layer: str | None,
              batch_size: int, device: str) -> dict[str, Any]:
    """Every method's maps (N, H, W) on CPU, explained ``batch_size`` images at a time."""
    import torch

    from convforge.data import normalize
    from convforge.inspect.saliency import explain

    maps: dict[str, list[Any]] = {method: [] for method in methods}
    step = max(1, batch_size)
    for start in range(0, len(views), step):
        chunk = torch.stack(views[start:start + step])
        x = normalize(chunk, loaded.mean, loaded.std).to(device)
        for method in methods:
            maps[method].append(explain(loaded.model, x, method, target=targets[start:start + step], layer=layer,
                                        **_method_options(method, batch_size, len(chunk))).float().cpu())
    return {method: torch.cat(parts) for method, parts in maps.items()}


def _check_model(loaded: Any, views: list[Any], layer: str | None, methods: list[str], device: str) -> str | None:
    """A classifier with a normalisation, and the Grad-CAM layer (checked, or the default one)."""
    import torch

    from convforge.data import normalize
    from convforge.inspect.saliency import LAYER_METHODS, default_layer
    from convforge.inspect.saliency.hooks import find_layer

    if loaded.task != "classify":
        raise ConfigError(f"{loaded.label} is a {loaded.task} checkpoint: saliency maps explain classifiers only")
    if loaded.mean is None:
        raise ConfigError(f"{loaded.label} has no normalisation: pass --mean and --std")
    x = normalize(torch.stack(views[:1]), loaded.mean, loaded.std).to(device)
    if layer:
        find_layer(loaded.model, layer, x)
        return layer
    return default_layer(loaded.model, x) if any(m in LAYER_METHODS for m in methods) else None


def _write(out: Path, stem: str, view: Any, maps: dict[str, Any]) -> dict[str, str]:
    from convforge.inspect.saliency import grid, overlay, write_png

    image = view.permute(1, 2, 0).numpy()
    files = {}
    for method, saliency in maps.items():
        name = f"{stem}.{method.replace('++', 'pp')}.png"
        write_png(out / name, overlay(image, saliency))
        files[method] = name
    grid_name = f"{stem}.grid.png"
    write_png(out / grid_name, grid(image, maps))
    return {"files": files, "grid": grid_name}  # type: ignore[dict-item]


def run_explain(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge explain``: one overlay per image and method, a grid per image, and explain.json."""
    from convforge.fileio import atomic_write_json
    from convforge.inspect.saliency import parse_methods
    from convforge.train.inference import predict

    methods = parse_methods(args.method)
    if args.source and (args.model or args.weights):  # with --model, the first IMAGE was taken for CKPT
        args.images, args.source = [args.source, *args.images], None
    device = runtime_device(args)
    loaded = load_source(args, device)
    views = model_views(loaded, args.images) if loaded.task == "classify" else []
    layer = _check_model(loaded, views, args.layer, methods, device)
    chosen = class_index(loaded.classes, args.target)
    predictions = predict(loaded, views, top_k=len(loaded.classes), device=device)
    targets = [chosen if chosen is not None else p["top"][0]["index"] for p in predictions]
    maps = _saliency(loaded, views, methods, targets, layer, args.batch_size, device)
    out = Path(args.out)
    records = []
    for i, (path, stem) in enumerate(zip(args.images, _file_stems(args.images))):
        best = predictions[i]["top"][0]
        probability = next(t["probability"] for t in predictions[i]["top"] if t["index"] == targets[i])
        written = _write(out, stem, views[i], {method: maps[method][i] for method in methods})
        records.append({"image": path, "class": best["class"], "index": best["index"],
                        "probability": best["probability"], "target": loaded.classes[targets[i]],
                        "target_index": targets[i], "target_probability": probability,
                        "size": [int(views[i].shape[2]), int(views[i].shape[1])], **written})
    result = {"checkpoint": loaded.label, "methods": methods, "layer": layer, "out": str(out),
              "explanations": records}
    result["json"] = str(atomic_write_json(out / "explain.json", result))
    if not args.json:
        _print_records(result)
    return result


def _print_records(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"saliency ({', '.join(result['methods'])}) -> {result['out']}")
    for column in ("image", "predicted", "probability", "explained", "grid"):
        table.add_column(column, justify="right" if column == "probability" else "left")
    for record in result["explanations"]:
        table.add_row(Path(record["image"]).name, record["class"], f"{100 * record['probability']:.1f}%", record["target"],
                      record["grid"])
    Console(soft_wrap=True).print(table)


COMMANDS = [
    Command("explain", "saliency maps of a classifier's predictions", _add_explain_arguments, run_explain,
            "Explain a classifier's predictions on image files with saliency maps: Grad-CAM, Grad-CAM++, FullGrad, "
            "integrated gradients (ig) and occlusion. Writes an overlay PNG per image and method, a grid per image "
            "and explain.json to --out."),
]
