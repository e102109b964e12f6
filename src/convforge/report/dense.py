"""The evaluation part of a report for segmentation and super-resolution runs: scores and example pictures."""

from __future__ import annotations

from typing import Any

import torch

EXAMPLES = 3
CROP = 96  # side of the super-resolution crops shown (HR pixels)


def evaluate_dense_checkpoint(ckpt: Any, spec: str) -> dict[str, Any]:
    """Scores on every evaluation split (or test set) and a few examples, as ``convforge eval`` computes them
    (a LoadedModel or a Checkpoint)."""
    from convforge.train.inference import as_loaded, dense_data, evaluate

    loaded = as_loaded(ckpt)
    prepared = dense_data(loaded, spec)
    task, _, data = prepared
    result = evaluate(loaded, prepared, "test", batch_size=16)
    scores = {name: value for name, value in result.items() if isinstance(value, dict)}
    examples = (_segment_examples(loaded, data, task.eval_splits(data)[-1]) if task.name == "segment"
                else _superres_examples(loaded, data) if task.name == "super-resolve" else [])
    return {"task": task.name, "data": result["data"], "scores": scores, "classes": list(loaded.classes),
            "examples": examples, "notes": list(getattr(data, "notes", []))}


def _segment_examples(loaded: Any, data: Any, split: str) -> list[dict[str, Any]]:
    from convforge.inspect.segmentation import overlay, palette_for
    from convforge.report.pictures import image_png
    from convforge.train.inference import segment

    images = data.split(split)
    palette = palette_for(loaded.classes)
    ignore = data.ignore_index
    examples = []
    for index in range(min(EXAMPLES, len(images.labels))):
        image, truth = images.images[index], images.labels[index].long()
        prediction = segment(loaded, image)["mask"].long()
        labelled = truth != ignore
        accuracy = float((prediction[labelled] == truth[labelled]).float().mean() * 100) if labelled.any() else None
        examples.append({"split": split, "index": index, "pixel_acc": accuracy,
                         "image": image_png(image, 240),
                         "truth": image_png(overlay(image, truth, 0.6, palette, ignore_index=ignore), 240),
                         "prediction": image_png(overlay(image, prediction, 0.6, palette), 240)})
    return examples


def _superres_examples(ckpt: Any, data: Any) -> list[dict[str, Any]]:
    """The centre crop of the first image of each test set: high resolution, bicubic, the model."""
    from convforge.data.superres import bicubic_pair, run_model, to_uint8
    from convforge.measure.quality import psnr
    from convforge.report.pictures import image_png

    scale = data.scale
    upsampled_input = bool(getattr(ckpt.model, "upsampled_input", False))
    examples = []
    for name, images in list(data.test_sets.items())[:EXAMPLES]:
        if not images:
            continue
        hr, lr, bicubic = bicubic_pair(images[0], scale)
        with torch.no_grad():
            output = run_model(ckpt.model.eval(), bicubic if upsampled_input else lr, "cpu").clamp(0, 1)
        pictures = {"hr": to_uint8(hr)[0], "bicubic": to_uint8(bicubic)[0], "model": to_uint8(output)[0]}
        height, width = pictures["hr"].shape[-2:]
        top, left = max(0, (height - CROP) // 2), max(0, (width - CROP) // 2)
        crops = {k: v[:, top:top + CROP, left:left + CROP] for k, v in pictures.items()}
        examples.append({"set": name, "psnr": psnr(pictures["model"], pictures["hr"], shave=scale),
                         "bicubic_psnr": psnr(pictures["bicubic"], pictures["hr"], shave=scale),
                         **{k: image_png(v, 2 * CROP) for k, v in crops.items()}})
    return examples


def dense_section(run: Any) -> str:
    """HTML of a dense run's evaluation (``run.evaluation`` from :func:`evaluate_dense_checkpoint`)."""
    from convforge.report.markup import esc, fmt, img, notes, table

    ev = run.evaluation
    name = run.checkpoint.name if run.checkpoint else ""
    out = [notes(ev["notes"])]
    if ev["task"] == "segment":
        splits = list(ev["scores"])
        rows = [(split, fmt(s.get("miou"), "pct"), fmt(s.get("pixel_acc"), "pct"), fmt(s.get("mean_acc"), "pct"))
                for split, s in ev["scores"].items()]
        out.append(f"<h3>Segmentation: mIoU and per-class IoU</h3><p class=\"sub\">{esc(name)} evaluated on "
                   f"{esc(ev['data'])}; IoU over the labelled pixels (the ignore value counts nowhere).</p>")
        per_class = []
        for i, cls in enumerate(ev["classes"]):
            cells = []
            for split in splits:
                values = ev["scores"][split].get("per_class_iou") or []
                value = values[i] if i < len(values) else None
                cells.append(("html", f'<span class="bar" style="width:{0 if value is None else value * 0.6:.1f}px">'
                                      f"</span>{'-' if value is None else f'{value:.1f}%'}"))
            per_class.append((cls, *cells))
        out.append(f'<div class="grid"><div>{table(("split", "mIoU", "pixel accuracy", "mean class accuracy"), rows, numeric=(1, 2, 3))}'
                   f'</div><div>{table(("class", *(f"{s} IoU" for s in splits)), per_class)}</div></div>')
        if ev["examples"]:
            out.append(f"<h3>Examples ({esc(ev['examples'][0]['split'])} split)</h3><p class=\"sub\">Each row: the "
                       f"image, the ground truth and the prediction (unlabelled pixels show the image).</p>")
            for item in ev["examples"]:
                caption = f"#{item['index']}: pixel accuracy {fmt(item['pixel_acc'], 'pct')}"
                out.append('<div class="wrong">' + img(item["image"], f"image {item['index']}", "image")
                           + img(item["truth"], f"ground truth {item['index']}", "ground truth")
                           + img(item["prediction"], f"prediction {item['index']}", caption) + "</div>")
    else:
        rows = [(set_name, f"{s['psnr']:.2f}", f"{s['ssim']:.4f}", f"{s['bicubic_psnr']:.2f}",
                 f"{s['bicubic_ssim']:.4f}", f"{s['psnr'] - s['bicubic_psnr']:+.2f}")
                for set_name, s in ev["scores"].items()]
        out.append(f"<h3>Super-resolution: PSNR and SSIM against bicubic</h3><p class=\"sub\">{esc(name)} on "
                   f"{esc(ev['data'])}: the Y channel, the scale shaved from each border, as the SR literature "
                   f"measures it.</p>")
        out.append(table(("test set", "PSNR (dB)", "SSIM", "bicubic PSNR", "bicubic SSIM", "gain (dB)"), rows,
                         numeric=(1, 2, 3, 4, 5)))
        for item in ev["examples"]:
            out.append(f"<h3>{esc(item['set'])}, first image: centre crop</h3>"
                       + '<div class="wrong">'
                       + img(item["hr"], "high resolution", "high resolution")
                       + img(item["bicubic"], "bicubic", f"bicubic {item['bicubic_psnr']:.2f} dB")
                       + img(item["model"], "model", f"model {item['psnr']:.2f} dB") + "</div>")
    return "".join(out)
