"""Prune a checkpoint, optionally after a regularised training phase, optionally fine-tune it (in one go or
in K prune/fine-tune steps), save the result.

The regularised phase (``sparsity_epochs``: DepGraph's group regulariser, see
:mod:`convforge.compress.regularize`) and the fine-tunes run on the training engine
(``convforge.train.engine.train`` with ``init`` = the checkpoint to train), in ``OUT.finetune/sparsity/``
and one run per step in ``OUT.finetune/step-K/``, so an interrupted command resumes where it stopped when
it is run again with the same arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from convforge.compress.finetune import SPARSITY_RUN, FineTuner, default_work_dir, epochs_per_step
from convforge.compress.pruning import prune, sparsity_report
from convforge.models.widths import changed_shapes
from convforge.errors import ConfigError, DataError
from convforge.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from convforge.train.inference import aligned_split

Log = Callable[[str], None]
TAYLOR_IMAGES = 512  # seeded training images whose loss gradients rank channels for --method taylor


def _echo(message: str) -> None:
    from convforge.progress import echo

    echo(message)


def top1(model: nn.Module, ckpt: Checkpoint, data, split: str = "test", batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of ``model`` on one split of ``data``, as ``ckpt`` (classes, normalisation) reads it."""
    from convforge.train.evaluate import evaluate

    return evaluate(model, aligned_split(ckpt, data, split), ckpt.mean, ckpt.std, batch_size=batch_size,
                    num_classes=len(ckpt.classes), details=False)["top1"]


def default_output(path: Path, method: str) -> Path:
    """Where ``convforge prune`` writes the pruned checkpoint when no --out is given."""
    return path.with_name(f"{path.stem}-pruned-{method}.safetensors")


def _step_target(method: str, step: int, steps: int, model: nn.Module, input_size: tuple[int, ...], macs0: int,
                 target_macs: float | None, sparsity: float | None) -> dict[str, float]:
    """The prune target of step ``step`` of ``steps``, so that the last step reaches the command's target."""
    from convforge.measure import count_macs

    frac = step / steps
    if target_macs is not None:
        return {"target_macs": min(1.0, (1 - (1 - target_macs) * frac) * macs0 / count_macs(model, input_size))}
    assert sparsity is not None
    if method == "global-magnitude":
        return {"sparsity": sparsity * frac}
    return {"sparsity": 1 - (1 - sparsity) ** (1 / steps)}  # per step, so that K steps remove `sparsity` in all


def _pruned_meta(ckpt: Checkpoint, model: nn.Module, method: str, classes: list[str]) -> dict[str, Any]:
    """``ckpt``'s metadata for the pruned ``model``: its widths (structured methods) and class order."""
    from convforge.models import create_model

    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version", "convforge_version", "created")}
    meta["classes"] = list(classes)
    if method != "global-magnitude":
        spec = ckpt.meta["model"]
        reference = create_model(spec["name"], num_classes=spec["num_classes"], in_chans=spec["in_chans"],
                                 **spec["args"])
        meta["pruned"] = {"method": method, "shapes": changed_shapes(model, reference),
                          "num_features": int(getattr(model, "num_features", 0)) or None}
    return meta


def _load_data(spec: str | None, ckpt: Checkpoint, needed: bool):
    """The data for fine-tuning and evaluation, loaded at the checkpoint's input size."""
    from convforge.train.inference import load_data

    if not needed:
        return None
    if not spec:
        raise ConfigError("fine-tuning needs data: pass --data SPEC (the checkpoint names none)")
    data = load_data(spec, image_size=tuple(ckpt.input_size[1:]))  # type: ignore[arg-type]
    if sorted(data.classes) != sorted(ckpt.classes):
        raise DataError(f"the classes of {spec} ({', '.join(data.classes[:12])}) are not those of {ckpt.path} "
                        f"({', '.join(ckpt.classes[:12])}): fine-tune and evaluate on data with the same classes")
    return data


def _taylor_gradients(model: nn.Module, ckpt: Checkpoint, dataset: Any, seed: int) -> dict[str, torch.Tensor]:
    """Loss gradients of ``model`` on TAYLOR_IMAGES seeded training images (what ``taylor`` ranks by)."""
    from convforge.compress.importance import loss_gradients
    from convforge.data import normalize

    if dataset is None:
        raise ConfigError("--method taylor ranks channels by loss gradients on training images: pass --data SPEC "
                          "(the checkpoint names no data)")
    split = aligned_split(ckpt, dataset, "train")
    pick = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:TAYLOR_IMAGES]
    x = normalize(split.images[pick], ckpt.mean, ckpt.std)
    y = torch.as_tensor(split.labels)[pick]
    return loss_gradients(model, [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(pick), 64)])


def _prune_step(model: nn.Module, current: Checkpoint, method: str, step: int, steps: int, macs0: int,
                target: dict[str, Any], dataset: Any):
    """Prune ``model`` by step ``step``'s share of the command's target."""
    kwargs = _step_target(method, step, steps, model, current.input_size, macs0, target["target_macs"],
                          target["sparsity"])
    gradients = _taylor_gradients(model, current, dataset, target["seed"] + step) if method == "taylor" else None
    return prune(model, current.input_size, method, min_share=target["min_share"], round_to=target["round_to"],
                 seed=target["seed"] + step, global_ranking=target["global_ranking"],
                 normalizer=target["normalizer"], gradients=gradients, **kwargs)


def _run_steps(ckpt: Checkpoint, start: Checkpoint, method: str, steps: int, target: dict[str, Any], dataset: Any,
               evaluate_split: str | None, tuner: FineTuner | None, log: Log) -> dict[str, Any]:
    """Prune ``start``'s model (and fine-tune) in ``steps`` steps; the final model, the checkpoint it follows,
    history, plan, notes. ``ckpt``: the command's checkpoint, whose description the pruned checkpoints carry."""
    from convforge.measure import count_macs, count_params

    input_size = ckpt.input_size
    macs0, params0 = count_macs(ckpt.model, input_size), count_params(ckpt.model)
    model, current = start.model, start  # current: whose classes and normalisation `model` follows
    history: list[dict[str, Any]] = []
    plan: list[dict[str, Any]] = []
    notes: list[str] = []
    finetune = tuner is not None and tuner.epochs > 0
    for step in range(1, steps + 1):
        saved = tuner.saved_step(step) if tuner is not None else None
        if saved is not None:
            entry, plan, notes = saved
            log(f"step {step}/{steps}: pruned by an earlier try ({tuner.pruned_path(step)})")  # type: ignore[union-attr]
            if not finetune:
                model = load_checkpoint(tuner.pruned_path(step)).model  # type: ignore[union-attr]
        else:
            result = _prune_step(model, current, method, step, steps, macs0, target, dataset)
            model, plan, notes = result.model, result.plan, result.notes
            entry = {"step": step, "macs": result.macs_after, "params": result.params_after}
            log(f"step {step}/{steps}: {method} -> {result.macs_after / macs0:.3f} of the MACs, "
                f"{result.params_after / params0:.3f} of the parameters")
            if dataset is not None and evaluate_split:
                entry["top1_pruned"] = top1(model, current, dataset, evaluate_split)
                log(f"  pruned, before fine-tuning: top-1 {entry['top1_pruned']:.2f}%")
            if tuner is not None:
                tuner.save_step(step, model, _pruned_meta(ckpt, model, method, current.classes), entry, result)
        if finetune:
            current, entry["finetune"] = tuner.run(step, tuner.pruned_path(step), log)  # type: ignore[union-attr]
            model = current.model.eval()
            if evaluate_split:
                entry["top1_finetuned"] = top1(model, current, dataset, evaluate_split)
                log(f"  fine-tuned: top-1 {entry['top1_finetuned']:.2f}%")
        history.append(entry)
    model.eval()
    return {"model": model, "classes": list(current.classes), "history": history, "plan": plan, "notes": notes,
            "macs_before": macs0, "params_before": params0}


def _regularise(ckpt: Checkpoint, tuner: FineTuner, epochs: int, reg: float, alpha: float, dataset: Any,
                evaluate_split: str | None, report: dict[str, Any], log: Log) -> Checkpoint:
    """The regularised phase: ``epochs`` of training from ``ckpt`` with the group regulariser; its checkpoint."""
    from convforge.compress.regularize import GroupRegularizer

    regularizer = GroupRegularizer(ckpt.model, ckpt.input_size, reg, alpha)
    log(f"regularised phase: {epochs} epoch(s), --sparsity-reg {reg:g}, --sparsity-alpha {alpha:g} "
        f"({regularizer.groups} channel groups)")
    trained, info = tuner.run_phase(SPARSITY_RUN, ckpt.path, epochs, tuner.seed, log, callbacks=[regularizer])
    report["sparsity_training"] = {**info, "reg": reg, "alpha": alpha}
    if dataset is not None and evaluate_split:
        report["top1_regularized"] = top1(trained.model.eval(), trained, dataset, evaluate_split)
        log(f"  regularised: top-1 {report['top1_regularized']:.2f}%")
    return trained


def prune_checkpoint(
    checkpoint: str | Path,
    method: str,
    *,
    target_macs: float | None = None,
    sparsity: float | None = None,
    min_share: float | None = None,
    round_to: int = 1,
    global_ranking: bool = False,
    normalizer: str = "mean",
    finetune_epochs: float = 0,
    sparsity_epochs: int = 0,
    sparsity_reg: float = 5e-4,
    sparsity_alpha: float = 4.0,
    data: str | None = None,
    steps: int = 1,
    distill: bool | str | Path = False,
    lr: float = 0.01,
    batch_size: int = 128,
    out: str | Path | None = None,
    dry_run: bool = False,
    evaluate_split: str | None = "test",
    seed: int = 0,
    amp: bool = False,
    channels_last: bool = False,
    device: str = "auto",
    threads: int | None = None,
    work_dir: str | Path | None = None,
    quiet: bool = False,
    log: Log = _echo,
) -> dict[str, Any]:
    """What ``convforge prune`` does; returns a JSON-able report (and writes the pruned checkpoint).

    Data for fine-tuning and evaluation is loaded at the checkpoint's input size. With
    ``sparsity_epochs``, the checkpoint first trains that many epochs with the group regulariser
    (strength ``sparsity_reg``, scale range 2 ** ``sparsity_alpha``; see
    :mod:`convforge.compress.regularize`) and the regularised model is pruned. With
    ``finetune_epochs``, each of the ``steps`` prune steps is followed by ``finetune_epochs / steps``
    epochs on the training engine (see :class:`FineTuner`); that must be a whole number (the engine
    trains whole epochs), else a ConfigError names both values. The runs live in ``work_dir``
    (default ``OUT.finetune/``: ``sparsity/``, then one ``step-K/`` run each); running the same command
    again after a crash reuses the finished runs and resumes the unfinished one. ``distill``: the fine-tunes
    also learn soft targets (knowledge distillation) of the unpruned ``checkpoint`` (True) or of the
    checkpoint file it names (a teacher trained on the fine-tuning data). ``global_ranking``,
    ``normalizer``: see :func:`convforge.compress.pruning.prune`. ``quiet``: the engine prints nothing.
    """
    ckpt = load_checkpoint(checkpoint)
    input_size = ckpt.input_size
    epochs, teacher = _fine_tuning_plan(ckpt.path, steps, finetune_epochs, sparsity_epochs, distill)
    target = {"target_macs": target_macs, "sparsity": sparsity, "min_share": min_share, "round_to": round_to,
              "seed": seed, "global_ranking": global_ranking, "normalizer": normalizer}
    spec = data or ckpt.meta.get("data", {}).get("spec")
    if dry_run:
        dataset = _load_data(spec, ckpt, needed=method == "taylor")
        gradients = _taylor_gradients(ckpt.model, ckpt, dataset, seed + 1) if method == "taylor" else None  # step 1
        checked = prune(ckpt.model, input_size, method, dry_run=True, gradients=gradients, **target)
        return {"checkpoint": str(ckpt.path), "dry_run": True, **checked.as_dict()}
    # The check that the whole target is reachable (it depends on the structure alone) comes before any
    # data loading or training.
    prune(ckpt.model, input_size, "l1-filter" if method == "taylor" else method, dry_run=True, **target)
    out_path = Path(out) if out else default_output(ckpt.path, method)
    if (epochs or sparsity_epochs) and input_size[1] != input_size[2]:
        raise ConfigError(f"{ckpt.path} takes {input_size[1]}x{input_size[2]} inputs, but fine-tuning on the "
                          "training engine trains on square images: fine-tune it with convforge train --init")
    dataset = _load_data(spec, ckpt, needed=bool(epochs or sparsity_epochs or data or method == "taylor"))
    tuner = None
    if epochs or sparsity_epochs:
        tuner = FineTuner(Path(work_dir) if work_dir else default_work_dir(out_path), spec, epochs, lr, batch_size,
                          image_size=input_size[1], keep_sparsity=method == "global-magnitude", seed=seed, amp=amp,
                          channels_last=channels_last, device=device, threads=threads, quiet=quiet,
                          teacher=str(teacher) if teacher else None)
        tuner.check_work_dir({"checkpoint": str(ckpt.path.resolve()), "modified": ckpt.path.stat().st_mtime_ns,
                              "method": method, **target, "steps": steps, "finetune_epochs": finetune_epochs,
                              "sparsity_epochs": sparsity_epochs, "sparsity_reg": sparsity_reg,
                              "sparsity_alpha": sparsity_alpha, "data": spec, "lr": lr, "batch_size": batch_size,
                              "amp": amp, "distill": str(teacher) if teacher else None})
    report: dict[str, Any] = {"checkpoint": str(ckpt.path), "method": method, "target_macs": target_macs,
                              "sparsity_target": sparsity, "steps": steps, "finetune_epochs": finetune_epochs,
                              "global_ranking": global_ranking, "normalizer": normalizer,
                              "sparsity_epochs": sparsity_epochs,
                              "sparsity_reg": sparsity_reg if sparsity_epochs else None,
                              "distill": str(teacher) if teacher else None}
    if dataset is not None and evaluate_split:
        report["top1_before"] = top1(ckpt.model, ckpt, dataset, evaluate_split)
        log(f"unpruned: top-1 {report['top1_before']:.2f}% on {evaluate_split}")
    start = ckpt
    if sparsity_epochs:
        start = _regularise(ckpt, tuner, int(sparsity_epochs), sparsity_reg, sparsity_alpha, dataset,  # type: ignore[arg-type]
                            evaluate_split, report, log)
    pruned = _run_steps(ckpt, start, method, steps, target, dataset, evaluate_split, tuner, log)
    report["output"] = str(_save_output(report, pruned, ckpt, method, evaluate_split, out_path, tuner))
    return report


def _fine_tuning_plan(checkpoint: Path, steps: int, finetune_epochs: float, sparsity_epochs: float,
                      distill: bool | str | Path) -> tuple[int, Path | None]:
    """The fine-tuning epochs per prune step and the distillation teacher, or a ConfigError for bad values."""
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if finetune_epochs < 0 or sparsity_epochs < 0 or int(sparsity_epochs) != sparsity_epochs:
        raise ConfigError(f"--finetune-epochs must be >= 0 and --sparsity-epochs a whole number >= 0, got "
                          f"{finetune_epochs:g} and {sparsity_epochs:g}")
    epochs = epochs_per_step(finetune_epochs, steps) if finetune_epochs > 0 else 0
    teacher = None if distill is False else checkpoint if distill is True else Path(distill)
    if teacher is not None and not teacher.is_file():
        raise ConfigError(f"--distill {teacher}: no such checkpoint file; give a convforge checkpoint to distil from, "
                          "or --distill alone for the unpruned input")
    if teacher is not None and not epochs:
        raise ConfigError("--distill trains the pruned model on a teacher's soft targets while it fine-tunes: "
                          "add --finetune-epochs N")
    return epochs, teacher


def _save_output(report: dict[str, Any], pruned: dict[str, Any], ckpt: Checkpoint, method: str,
                 evaluate_split: str | None, out_path: Path, tuner: FineTuner | None) -> Path:
    """Complete ``report`` with the final sizes and accuracy and save the pruned checkpoint to ``out_path``."""
    from convforge.measure import count_macs, count_params

    model, history = pruned["model"], pruned["history"]
    macs0 = pruned["macs_before"]
    report.update({"macs_before": macs0, "macs_after": count_macs(model, ckpt.input_size),
                   "params_before": pruned["params_before"], "params_after": count_params(model),
                   "history": history, "plan": pruned["plan"], "notes": pruned["notes"]})
    report["macs_ratio"] = report["macs_after"] / macs0
    final_top1 = history[-1].get("top1_finetuned", history[-1].get("top1_pruned"))
    if final_top1 is not None:
        report["top1_after"] = final_top1
    meta = _pruned_meta(ckpt, model, method, pruned["classes"])
    if method == "global-magnitude":
        report["sparsity"] = sparsity_report(model)
        meta["sparsity"] = {"method": method, "overall": report["sparsity"]["overall"],
                            "layers": {k: v["sparsity"] for k, v in report["sparsity"]["layers"].items()}}
    meta["compress"] = {k: report[k] for k in ("method", "target_macs", "sparsity_target", "steps", "finetune_epochs",
                                               "global_ranking", "normalizer", "sparsity_epochs", "sparsity_reg",
                                               "distill", "macs_before", "macs_after", "params_before",
                                               "params_after")}
    meta["compress"]["source"] = str(ckpt.path)
    if tuner is not None:
        meta["compress"]["finetune_runs"] = str(tuner.work_dir)
    if final_top1 is not None:
        meta["metrics"] = {f"{evaluate_split}_top1": final_top1}
    return save_checkpoint(out_path, model, meta)
