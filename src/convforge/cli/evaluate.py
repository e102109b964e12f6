"""``convforge eval``, ``predict``, ``segment`` and ``upscale``: every task through convforge.train.inference."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from convforge.cli.common import Command, add_model_source, add_runtime, load_source, runtime_device
from convforge.errors import ConfigError, ConvforgeError

SPLITS = ("test", "val", "train")


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source(parser)
    parser.add_argument("--data", help="data spec (default: the checkpoint's own data)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split to evaluate (default: test)")
    parser.add_argument("--skip-bad-images", action="store_true", help="skip undecodable images with a warning")
    add_runtime(parser, batch_help="evaluation batch size")


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge eval``: the task's scores on a split of the checkpoint's data or ``--data``."""
    from convforge.train.inference import classes_for, evaluate, is_checkpoint_path, load_data

    device = runtime_device(args)
    foreign = args.weights or args.model or (args.source and not is_checkpoint_path(args.source))
    if foreign and not args.data and not (args.source and (args.model or args.weights)):
        if args.weights and not args.model:
            raise ConfigError("give a checkpoint (CKPT), or --model NAME and --weights FILE")
        raise ConfigError("foreign weights need --data SPEC" if args.weights else
                          "a registry model has no data of its own: pass --data SPEC")
    data: Any = args.data
    overrides: dict[str, Any] = {}
    if foreign and args.data and not (args.source and args.weights):
        data = load_data(args.data, args.image_size, args.skip_bad_images)
        overrides = {"num_classes": args.num_classes or data.num_classes,
                     "classes": classes_for(data, args.num_classes)}
        if args.image_size is None:
            overrides["image_size"] = tuple(data.image_size)
    loaded = load_source(args, device, **overrides)
    result = evaluate(loaded, data, args.split, batch_size=args.batch_size, device=device, tta=args.tta,
                      image_size=args.image_size, skip_bad_images=args.skip_bad_images)
    if not args.json:
        (print_eval if loaded.task == "classify" else print_dense)(result)
    return result


def print_eval(result: dict[str, Any]) -> None:
    """A classification result: the summary line, per-class accuracy and (up to 20 classes) the confusion matrix."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    for note in result.get("notes", []):
        console.print(f"note: {note}", markup=False)
    console.print(f"{result['model']} on {result['data']} ({result['split']}, {result['images']} images"
                  f"{', flip TTA' if result['tta'] else ''}): top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
                  f"loss {result['loss']:.4f}", markup=False)
    classes = result["classes"]
    per_class = Table(title="per-class accuracy")
    per_class.add_column("class")
    per_class.add_column("accuracy", justify="right")
    per_class.add_column("images", justify="right")
    for i, name in enumerate(classes):
        acc = result["per_class"][i]
        per_class.add_row(name, "-" if acc is None else f"{acc:.2f}%", str(sum(result["confusion"][i])))
    console.print(per_class)
    if len(classes) <= 20:
        matrix = Table(title="confusion matrix (rows: true, columns: predicted)")
        matrix.add_column("")
        for name in classes:
            matrix.add_column(name[:6], justify="right")
        for name, row in zip(classes, result["confusion"]):
            matrix.add_row(name[:10], *map(str, row))
        console.print(matrix)


def print_dense(result: dict[str, Any]) -> None:
    """A segmentation or super-resolution result: one line of scores per evaluated split."""
    for note in result.get("notes", []):
        print(f"note: {note}")
    for key, scores in result.items():
        if not isinstance(scores, dict):
            continue
        shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()
                          if not isinstance(v, list))
        print(f"{result['model']} on {result['data']} [{key}]: {shown}")
        if "per_class_iou" in scores:
            print("  per-class IoU: " + ", ".join("-" if v is None else f"{v:.1f}" for v in scores["per_class_iou"]))


def _add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--top-k", type=int, default=5, help="classify: classes to show per image (default: 5)")
    parser.add_argument("--out", help="segment / super-resolve: folder for the masks or upscaled images "
                                      "(default: next to each image)")
    add_runtime(parser, batch_help="unused by predict; accepted like every model command")


def run_predict(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge predict``: top-k classes, or masks (segment) or upscaled images (super-resolve) per image."""
    from convforge.train.inference import predict

    if args.source and (args.model or args.weights):  # with --model, the first IMAGE was taken for CKPT
        args.images, args.source = [args.source, *args.images], None
    device = runtime_device(args)
    loaded = load_source(args, device)
    predictions = predict(loaded, args.images, top_k=args.top_k, tta=args.tta, device=device)
    if loaded.task == "segment":
        predictions = [_save_mask(loaded, item, _beside(item["image"], args.out, ".mask.png"), None, 0.5)
                       for item in predictions]
    elif loaded.task == "super-resolve":
        predictions = [_save_upscaled(item, _beside(item["image"], args.out, f".x{item['scale']}.png"))
                       for item in predictions]
    if not args.json:
        for item in predictions:
            if "top" in item:
                best = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in item["top"])
            else:
                best = " ".join(f"{k} {v}" for k, v in item.items() if k != "image")
            print(f"{item['image']}: {best}")
    return {"checkpoint": loaded.label, "task": loaded.task, "predictions": predictions}


def _beside(image: str, folder: str | None, suffix: str) -> Path:
    path = Path(image)
    return (Path(folder) if folder else path.parent) / (path.stem + suffix)


def _write_picture(path: str | Path, picture: Any) -> Path:
    from PIL import Image

    from convforge.fileio import atomic_write

    target = Path(path)
    image_format = Image.registered_extensions().get(target.suffix.lower())
    if image_format is None:
        raise ConvforgeError(f"cannot tell the image format of {target} from its extension: use .png, .jpg, ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, lambda tmp: picture.save(tmp, format=image_format))


def _to_picture(image: Any) -> Any:
    import numpy as np
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[2] == 1 else array))


def _save_mask(loaded: Any, item: dict[str, Any], out: Path, overlay_path: str | None, alpha: float) -> dict:
    """Write the palette mask PNG and the overlay of one segmented image; the JSON-able record."""
    import torch
    from PIL import Image

    from convforge.inspect.segmentation import overlay, palette_for
    from convforge.train.inference import load_images

    mask = item["mask"]
    palette = palette_for(loaded.classes)
    picture = Image.fromarray(mask.numpy(), mode="L")
    colours = torch.zeros(256, 3, dtype=torch.uint8)
    colours[: min(256, palette.shape[0])] = palette[:256]
    picture.putpalette(colours.flatten().tolist())
    written = _write_picture(out, picture)
    over = Path(overlay_path) if overlay_path else written.with_name(written.stem + ".overlay.png")
    image = load_images([item["image"]])[0]
    _write_picture(over, _to_picture(overlay(image, mask, alpha, palette)))
    return {"image": item["image"], "mask": str(written), "overlay": str(over), "class_shares": item["class_shares"]}


def _save_upscaled(item: dict[str, Any], out: Path) -> dict[str, Any]:
    upscaled = item["output"]
    written = _write_picture(out, _to_picture(upscaled))
    return {"image": item["image"], "out": str(written), "scale": item["scale"],
            "size": [int(upscaled.shape[2]), int(upscaled.shape[1])]}


def _add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source(parser)
    parser.add_argument("image", metavar="IMAGE", help="image file")
    parser.add_argument("--out", required=True, help="mask PNG to write")
    parser.add_argument("--overlay", help="overlay PNG to write (default: OUT with .overlay.png)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the mask colours (default: 0.5)")
    add_runtime(parser, batch_help="unused by segment; accepted like every model command")


def run_segment(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge segment``: the class mask (palette PNG) and a coloured overlay of one image."""
    from convforge.train.inference import predict, require_task

    device = runtime_device(args)
    loaded = load_source(args, device)
    require_task(loaded, "segment")
    item = predict(loaded, [args.image], tta=args.tta, device=device)[0]
    record = _save_mask(loaded, item, Path(args.out), args.overlay, args.alpha)
    if not args.json:
        print(f"{args.image}: mask {record['mask']}, overlay {record['overlay']}")
        print("  " + ", ".join(f"{name} {share:.1f}%" for name, share in
                               sorted(record["class_shares"].items(), key=lambda pair: -pair[1])))
    return {"checkpoint": loaded.label, **record}


def _add_upscale_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source(parser)
    parser.add_argument("image", metavar="IMAGE", help="image file")
    parser.add_argument("--out", required=True, help="image file to write (format from the extension, e.g. .png)")
    add_runtime(parser, batch_help="unused by upscale; accepted like every model command")


def run_upscale(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge upscale``: one image super-resolved by the model's scale (luma by the model, chroma bicubic)."""
    from convforge.train.inference import predict, require_task

    device = runtime_device(args)
    loaded = load_source(args, device)
    require_task(loaded, "super-resolve")
    item = predict(loaded, [args.image], tta=args.tta, device=device)[0]
    record = _save_upscaled(item, Path(args.out))
    if not args.json:
        width, height = record["size"]
        print(f"{args.image} -> {record['out']} ({width}x{height}), x{record['scale']}")
    return {"checkpoint": loaded.label, **record}


COMMANDS = [
    Command("eval", "evaluate a model on a data split (any task)", _add_eval_arguments, run_eval,
            "Evaluate a checkpoint (CKPT), a registry model or foreign weights (--model NAME --weights FILE): "
            "classification: top-1, top-5, per-class accuracy, confusion matrix; segmentation: mIoU, pixel "
            "accuracy, per-class IoU; super-resolution: PSNR and SSIM against bicubic."),
    Command("predict", "predict images: top-k classes, masks or upscaled images", _add_predict_arguments,
            run_predict, "Run a model on image files: the top-k classes of a classifier, the class masks of a "
                         "segmentation model, the upscaled images of a super-resolution model."),
    Command("segment", "per-pixel classes of an image with a segmentation checkpoint", _add_segment_arguments,
            run_segment, "Segment IMAGE with a checkpoint trained with --task segment: writes the class mask as a "
                         "palette PNG (pixel value = class index) and a coloured overlay."),
    Command("upscale", "super-resolve an image with a super-resolution checkpoint", _add_upscale_arguments,
            run_upscale, "Upscale IMAGE by the checkpoint's scale (trained with --task super-resolve): the model "
                         "on the luma channel, bicubic on the chroma."),
]
