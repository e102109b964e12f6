"""Prune a checkpoint, optionally fine-tune it (in one go or in K prune/fine-tune steps), save the result."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from convforge.compress.prune import (
    PruneResult,
    apply_masks,
    magnitude_masks,
    prune,
    sparsity_report,
)
from convforge.compress.widths import changed_shapes
from convforge.errors import ConfigError
from convforge.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

Log = Callable[[str], None]


def _echo(message: str) -> None:
    from convforge.progress import echo

    echo(message)


def aligned_split(ckpt: Checkpoint, data, split: str):
    """A split of ``data`` with labels in the checkpoint's class order and its channel count."""
    from convforge.predict import align_split

    if getattr(data, split, None) is None:
        raise ConfigError(f"dataset {data.spec!r} has no {split!r} split")
    return align_split(data.split(split), data.classes, ckpt.classes, ckpt.input_size[0], [])


def top1(model: nn.Module, ckpt: Checkpoint, data, split: str = "test", batch_size: int = 256) -> float:
    from convforge.train.evaluate import evaluate

    return evaluate(model, aligned_split(ckpt, data, split), ckpt.mean, ckpt.std, batch_size=batch_size,
                    num_classes=len(ckpt.classes), details=False)["top1"]


def finetune(
    model: nn.Module,
    ckpt: Checkpoint,
    data,
    epochs: float,
    *,
    lr: float = 0.01,
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    masks: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    amp: bool = False,
    channels_last: bool = False,
    log: Log = _echo,
) -> dict[str, Any]:
    """SGD (Nesterov, momentum 0.9) with a cosine schedule from ``lr`` for ``epochs`` (may be fractional)
    on the train split, with the dataset's default augmentation; ``masks`` stay applied after every step.
    ``amp``: bfloat16 autocast; ``channels_last``: that memory format while training (CPU speed-ups)."""
    from convforge.data import BatchLoader
    from convforge.train.optim import lr_at, param_groups

    train = aligned_split(ckpt, data, "train")
    size = ckpt.input_size[1:]
    loader = BatchLoader(train, batch_size, ckpt.mean, ckpt.std, shuffle=True, augment=data.default_augment,
                         crop_padding=max(1, min(size) // 8), drop_last=True, seed=seed, channels_last=channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(loader)
    total = max(1, round(epochs * steps_per_epoch))
    optimizer = torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=0.9, nesterov=True)
    model.train()
    step, start, seen, loss_sum = 0, time.perf_counter(), 0, 0.0
    start_chunk = start
    epoch = 0
    while step < total:
        loader.set_epoch(epoch)
        for x, y in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, 0, lr, "cosine")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if masks:
                apply_masks(model, masks)
            loss_sum += float(loss.detach()) * y.shape[0]
            seen += y.shape[0]
            step += 1
            if step % max(1, steps_per_epoch // 4) == 0 or step == total:
                log(f"  fine-tune step {step}/{total}  loss {loss_sum / seen:.4f}  "
                    f"{seen / (time.perf_counter() - start_chunk):.0f} img/s")
                loss_sum, seen, start_chunk = 0.0, 0, time.perf_counter()
            if step >= total:
                break
        epoch += 1
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return {"steps": total, "epochs": epochs, "lr": lr, "batch_size": batch_size, "amp": amp,
            "channels_last": channels_last, "seconds": time.perf_counter() - start}


def default_output(path: Path, method: str) -> Path:
    return path.with_name(f"{path.stem}-pruned-{method}.safetensors")


def prune_checkpoint(
    checkpoint: str | Path,
    method: str,
    *,
    target_macs: float | None = None,
    sparsity: float | None = None,
    min_share: float | None = None,
    round_to: int = 1,
    finetune_epochs: float = 0,
    data: str | None = None,
    steps: int = 1,
    lr: float = 0.01,
    batch_size: int = 128,
    out: str | Path | None = None,
    dry_run: bool = False,
    evaluate_split: str | None = "test",
    seed: int = 0,
    amp: bool = False,
    channels_last: bool = False,
    log: Log = _echo,
) -> dict[str, Any]:
    """What ``convforge prune`` does; returns a JSON-able report (and writes the pruned checkpoint)."""
    from convforge.measure import count_macs, count_params
    from convforge.predict import load_data_for

    ckpt = load_checkpoint(checkpoint)
    input_size = ckpt.input_size
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    if dry_run:
        result = prune(ckpt.model, input_size, method, target_macs=target_macs, sparsity=sparsity,
                       min_share=min_share, round_to=round_to, dry_run=True, seed=seed)
        return {"checkpoint": str(ckpt.path), "dry_run": True, **result.as_dict()}
    # Validate the whole target (reachable?) before any data loading or fine-tuning.
    prune(ckpt.model, input_size, method, target_macs=target_macs, sparsity=sparsity, min_share=min_share,
          round_to=round_to, dry_run=True, seed=seed)
    spec = data or ckpt.meta.get("data", {}).get("spec")
    dataset = None
    if finetune_epochs > 0 or data:
        if not spec:
            raise ConfigError("fine-tuning needs data: pass --data SPEC (the checkpoint names none)")
        dataset = load_data_for(spec)
    report: dict[str, Any] = {"checkpoint": str(ckpt.path), "method": method, "target_macs": target_macs,
                              "sparsity_target": sparsity, "steps": steps, "finetune_epochs": finetune_epochs}
    macs0, params0 = count_macs(ckpt.model, input_size), count_params(ckpt.model)
    if dataset is not None and evaluate_split:
        report["top1_before"] = top1(ckpt.model, ckpt, dataset, evaluate_split)
        log(f"unpruned: top-1 {report['top1_before']:.2f}% on {evaluate_split}")
    model = ckpt.model
    history = []
    masks = None
    result: PruneResult | None = None
    for step in range(1, steps + 1):
        frac = step / steps
        kwargs: dict[str, Any] = {}
        if target_macs is not None:
            current = count_macs(model, input_size)
            kwargs["target_macs"] = min(1.0, (1 - (1 - target_macs) * frac) * macs0 / current)
        elif method == "global-magnitude":
            kwargs["sparsity"] = sparsity * frac
        else:  # the share of channels removed per step so that K steps remove `sparsity` in all
            kwargs["sparsity"] = 1 - (1 - sparsity) ** (1 / steps)
        result = prune(model, input_size, method, min_share=min_share, round_to=round_to, seed=seed + step, **kwargs)
        model = result.model
        entry: dict[str, Any] = {"step": step, "macs": result.macs_after, "params": result.params_after}
        if method == "global-magnitude":
            masks = magnitude_masks(model, kwargs["sparsity"], result.sparsity["min_share"])
        log(f"step {step}/{steps}: {method} -> {result.macs_after / macs0:.3f} of the MACs, "
            f"{result.params_after / params0:.3f} of the parameters")
        if dataset is not None and evaluate_split:
            entry["top1_pruned"] = top1(model, ckpt, dataset, evaluate_split)
            log(f"  pruned, before fine-tuning: top-1 {entry['top1_pruned']:.2f}%")
        if finetune_epochs > 0:
            entry["finetune"] = finetune(model, ckpt, dataset, finetune_epochs / steps, lr=lr, batch_size=batch_size,
                                         masks=masks, seed=seed + step, amp=amp, channels_last=channels_last, log=log)
            if evaluate_split:
                entry["top1_finetuned"] = top1(model, ckpt, dataset, evaluate_split)
                log(f"  fine-tuned: top-1 {entry['top1_finetuned']:.2f}%")
        history.append(entry)
    assert result is not None
    model.eval()
    report.update({"macs_before": macs0, "macs_after": count_macs(model, input_size), "params_before": params0,
                   "params_after": count_params(model), "history": history, "plan": result.plan,
                   "notes": result.notes})
    report["macs_ratio"] = report["macs_after"] / macs0
    final_top1 = history[-1].get("top1_finetuned", history[-1].get("top1_pruned"))
    if final_top1 is not None:
        report["top1_after"] = final_top1
    if method == "global-magnitude":
        report["sparsity"] = sparsity_report(model)

    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version", "convforge_version", "created")}
    if method != "global-magnitude":
        from convforge.models import create_model

        spec_m = ckpt.meta["model"]
        reference = create_model(spec_m["name"], num_classes=spec_m["num_classes"], in_chans=spec_m["in_chans"],
                                 **spec_m["args"])
        meta["pruned"] = {"method": method, "shapes": changed_shapes(model, reference),
                          "num_features": int(getattr(model, "num_features", 0)) or None}
    else:
        meta["sparsity"] = {"method": method, "overall": report["sparsity"]["overall"],
                            "layers": {k: v["sparsity"] for k, v in report["sparsity"]["layers"].items()}}
    meta["compress"] = {k: report[k] for k in ("method", "target_macs", "sparsity_target", "steps", "finetune_epochs",
                                               "macs_before", "macs_after", "params_before", "params_after")}
    meta["compress"]["source"] = str(ckpt.path)
    if final_top1 is not None:
        meta["metrics"] = {f"{evaluate_split}_top1": final_top1}
    out_path = Path(out) if out else default_output(ckpt.path, method)
    report["output"] = str(save_checkpoint(out_path, model, meta))
    return report
