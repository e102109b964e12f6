"""Dense-prediction commands: ``convforge segment`` and ``convforge upscale``, and ``eval`` of dense checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from convforge.errors import ConvforgeError
from convforge.fileio import atomic_write


def add_parsers(sub: argparse._SubParsersAction, add_json: Callable[[argparse.ArgumentParser], None]) -> None:
    seg = sub.add_parser("segment", help="per-pixel classes of an image with a segmentation checkpoint",
                         description="Segment IMAGE with a checkpoint trained with --task segment: writes the class "
                                     "mask as a palette PNG (pixel value = class index) and a coloured overlay.")
    seg.add_argument("checkpoint", metavar="CKPT", help="checkpoint .safetensors, its .json, or a run directory")
    seg.add_argument("image", metavar="IMAGE", help="image file")
    seg.add_argument("--out", required=True, help="mask PNG to write")
    seg.add_argument("--overlay", help="overlay PNG to write (default: OUT with .overlay.png)")
    seg.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the mask colours (default: 0.5)")
    add_json(seg)

    up = sub.add_parser("upscale", help="super-resolve an image with a super-resolution checkpoint",
                        description="Upscale IMAGE by the checkpoint's scale (trained with --task super-resolve): "
                                    "the model on the luma channel, bicubic on the chroma.")
    up.add_argument("checkpoint", metavar="CKPT", help="checkpoint .safetensors, its .json, or a run directory")
    up.add_argument("image", metavar="IMAGE", help="image file")
    up.add_argument("--out", required=True, help="image file to write (format from the extension, e.g. .png)")
    add_json(up)


def _load(path: str, task: str):
    from convforge.train import load_checkpoint

    ckpt = load_checkpoint(path)
    found = ckpt.meta.get("task", "classify")
    if found != task:
        command = {"classify": "predict", "segment": "segment", "super-resolve": "upscale"}[found]
        raise ConvforgeError(f"{ckpt.path} is a {found} checkpoint, not a {task} one: use `convforge {command}`")
    return ckpt


def _read_image(path: str) -> torch.Tensor:
    from convforge.data.imagefolder import decode_image

    return torch.from_numpy(decode_image(path, None)).permute(2, 0, 1).contiguous()


def _write_png(path: str | Path, picture: Image.Image) -> Path:
    target = Path(path)
    image_format = Image.registered_extensions().get(target.suffix.lower())
    if image_format is None:
        raise ConvforgeError(f"cannot tell the image format of {target} from its extension: use .png, .jpg, ...")
    return atomic_write(target, lambda tmp: picture.save(tmp, format=image_format))


def _to_picture(image: torch.Tensor) -> Image.Image:
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[2] == 1 else array))


def cmd_segment(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.inspect.segmentation import overlay, palette_for, segment_image

    ckpt = _load(args.checkpoint, "segment")
    image = _read_image(args.image)
    with torch.no_grad():
        mask = segment_image(ckpt.model, image, ckpt.mean, ckpt.std)
    palette = palette_for(ckpt.classes)
    mask_picture = Image.fromarray(mask.numpy(), mode="L")
    colours = torch.zeros(256, 3, dtype=torch.uint8)
    colours[: min(256, palette.shape[0])] = palette[:256]
    mask_picture.putpalette(colours.flatten().tolist())
    out = _write_png(args.out, mask_picture)
    overlay_path = Path(args.overlay) if args.overlay else out.with_name(out.stem + ".overlay.png")
    _write_png(overlay_path, _to_picture(overlay(image, mask, args.alpha, palette)))
    counts = torch.bincount(mask.flatten().long(), minlength=len(ckpt.classes))
    shares = {name: round(100.0 * int(counts[i]) / mask.numel(), 2) for i, name in enumerate(ckpt.classes)
              if counts[i]}
    if not args.json:
        print(f"{args.image}: mask {out}, overlay {overlay_path}")
        print("  " + ", ".join(f"{name} {share:.1f}%" for name, share in
                               sorted(shares.items(), key=lambda item: -item[1])))
    return {"checkpoint": str(ckpt.path), "image": args.image, "mask": str(out), "overlay": str(overlay_path),
            "class_shares": shares}


def cmd_upscale(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.data.superres import upscale_rgb

    ckpt = _load(args.checkpoint, "super-resolve")
    image = _read_image(args.image)
    scale = int(ckpt.meta.get("scale") or getattr(ckpt.model, "scale"))
    upscaled = upscale_rgb(ckpt.model, image, scale, bool(getattr(ckpt.model, "upsampled_input", False)))
    out = _write_png(args.out, _to_picture(upscaled))
    if not args.json:
        print(f"{args.image} ({image.shape[2]}x{image.shape[1]}) -> {out} ({upscaled.shape[2]}x{upscaled.shape[1]}), "
              f"x{scale}")
    return {"checkpoint": str(ckpt.path), "image": args.image, "out": str(out), "scale": scale,
            "size": [int(upscaled.shape[2]), int(upscaled.shape[1])]}


def dense_data(ckpt, spec: str | None, batch_size: int = 16):
    """(task, config, data) to evaluate a segmentation or super-resolution checkpoint on its own data (or ``spec``)."""
    from convforge.config import TrainConfig
    from convforge.train.tasks import get_task

    task = get_task(ckpt.meta["task"])
    recipe = dict(ckpt.meta.get("recipe") or {})
    cfg = TrainConfig(task=task.name, data=spec or ckpt.meta["data"]["spec"], batch_size=batch_size,
                      scale=int(ckpt.meta.get("scale") or recipe.get("scale") or 3))
    return task, cfg, task.load_data(cfg, lambda message: None)


def evaluate_dense(ckpt, spec: str | None, split: str, batch_size: int, loaded=None) -> dict[str, Any]:
    """``convforge eval`` of a segmentation or super-resolution checkpoint on its own data (or ``spec``);
    ``loaded``: what :func:`dense_data` returned, when the caller has it already."""
    task, cfg, data = loaded or dense_data(ckpt, spec, batch_size)
    splits = task.eval_splits(data) if split == "test" else [split]
    result: dict[str, Any] = {"checkpoint": str(ckpt.path), "model": ckpt.meta["model"]["name"], "task": task.name,
                              "data": cfg.data, "notes": []}
    for name in splits:
        try:
            scores = task.evaluate(ckpt.model, data, name, cfg, torch.device("cpu"), 0, 1)
        except KeyError:
            raise ConvforgeError(f"{cfg.data} has no {name!r} split") from None
        result[name] = scores
    return result


def print_dense(result: dict[str, Any]) -> None:
    for key, scores in result.items():
        if not isinstance(scores, dict):
            continue
        shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()
                          if not isinstance(v, list))
        print(f"{result['model']} on {result['data']} [{key}]: {shown}")
        if "per_class_iou" in scores:
            print("  per-class IoU: " + ", ".join("-" if v is None else f"{v:.1f}" for v in scores["per_class_iou"]))


COMMANDS = {"segment": cmd_segment, "upscale": cmd_upscale}
