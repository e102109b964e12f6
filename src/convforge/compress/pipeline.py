"""Prune a checkpoint, optionally fine-tune it (in one go or in K prune/fine-tune steps), save the result.

Fine-tuning runs on the training engine (``convforge.train.engine.train`` with ``init`` = the pruned
checkpoint), one run per step in ``OUT.finetune/step-K/``, so an interrupted command resumes where it
stopped when it is run again with the same arguments.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from convforge.compress.pruning import PruneResult, prune, sparsity_report
from convforge.config import TrainConfig
from convforge.models.widths import changed_shapes
from convforge.errors import ConfigError, DataError
from convforge.fileio import atomic_write_json
from convforge.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from convforge.train.inference import aligned_split

Log = Callable[[str], None]
SAFETENSORS = ".safetensors"


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


def default_work_dir(out_path: Path) -> Path:
    """The folder of the fine-tuning runs of output ``out_path``: ``OUT.finetune/`` next to it."""
    name = out_path.name[:-len(SAFETENSORS)] if out_path.name.endswith(SAFETENSORS) else out_path.name
    return out_path.with_name(f"{name}.finetune")


def epochs_per_step(finetune_epochs: float, steps: int) -> int:
    """The whole number of epochs each of ``steps`` fine-tunes trains (the engine trains whole epochs)."""
    per_step = finetune_epochs / steps
    if per_step < 1 or not math.isclose(per_step, round(per_step), abs_tol=1e-9):
        whole = max(1, round(per_step)) * steps
        raise ConfigError(f"--finetune-epochs {finetune_epochs:g} over --steps {steps} is {per_step:g} epochs per "
                          f"step, but fine-tuning trains whole epochs: give --finetune-epochs a multiple of --steps "
                          f"(e.g. --finetune-epochs {whole}) or change --steps")
    return round(per_step)


@dataclass
class FineTuner:
    """Runs (or resumes) one step's fine-tune on the training engine, in ``work_dir/step-K/``.

    The recipe is ``convforge prune``'s: SGD (Nesterov, momentum 0.9, weight decay 5e-4), cosine from
    ``lr`` without warm-up, the data's default augmentation and crop padding (size / 8);
    ``keep_sparsity`` holds the pruned zeros at zero (global magnitude).
    """

    work_dir: Path
    data: str
    epochs: int
    lr: float
    batch_size: int
    image_size: int | None
    keep_sparsity: bool
    seed: int = 0
    amp: bool = False
    channels_last: bool = False
    device: str = "auto"
    threads: int | None = None
    quiet: bool = False

    def check_work_dir(self, signature: dict[str, Any]) -> None:
        """Start ``work_dir`` for this command, or check that the runs it holds are this command's."""
        file = self.work_dir / "prune.json"
        if file.is_file():
            saved = json.loads(file.read_text())
            differ = sorted(k for k in signature.keys() | saved.keys() if saved.get(k) != signature.get(k))
            if differ:
                raise ConfigError(
                    f"{self.work_dir} holds the fine-tuning runs of another prune command (different "
                    f"{', '.join(differ)}): delete that folder to start over, or choose another --out")
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(file, signature)

    def saved_step(self, step: int) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]] | None:
        """The report entry, plan and notes of step ``step`` when an earlier try already pruned it."""
        file = self.work_dir / f"step-{step}.state.json"
        if not file.is_file() or not self.pruned_path(step).is_file():
            return None
        state = json.loads(file.read_text())
        return state["entry"], state["plan"], state["notes"]

    def save_step(self, step: int, model: nn.Module, meta: dict[str, Any], entry: dict[str, Any],
                  result: PruneResult) -> None:
        """Keep step ``step``'s pruned checkpoint (the fine-tune's ``init``) and its report entry."""
        save_checkpoint(self.pruned_path(step), model, meta)
        atomic_write_json(self.work_dir / f"step-{step}.state.json",
                          {"entry": entry, "plan": result.plan, "notes": result.notes})

    def pruned_path(self, step: int) -> Path:
        """Step ``step``'s pruned checkpoint, before fine-tuning."""
        return self.work_dir / f"step-{step}.pruned.safetensors"

    def run(self, step: int, init: Path, log: Log) -> tuple[Checkpoint, dict[str, Any]]:
        """Fine-tune the pruned checkpoint ``init`` (or resume/reuse an earlier try); the tuned checkpoint."""
        from convforge.train import engine

        run_dir = self.work_dir / f"step-{step}"
        done = self._completed(run_dir)
        if done is not None:
            log(f"  fine-tune: reusing the finished run {run_dir}")
            summary = done
        elif (run_dir / "resume.safetensors").is_file():
            log(f"  fine-tune: resuming the interrupted run {run_dir}")
            summary = engine.train(TrainConfig(resume=str(run_dir), device=self.device, threads=self.threads),
                                   quiet=self.quiet)
        else:
            log(f"  fine-tune: {self.epochs} epoch(s) in {run_dir}")
            summary = engine.train(self._config(step, init, run_dir), quiet=self.quiet)
        tuned = load_checkpoint(run_dir / "last.safetensors")
        info = {"steps": self._optimizer_steps(tuned), "epochs": self.epochs, "lr": self.lr,
                "batch_size": self.batch_size, "amp": self.amp, "channels_last": self.channels_last,
                "seconds": summary.get("train_time_s", 0.0), "run_dir": str(run_dir)}
        return tuned, info

    def _config(self, step: int, init: Path, run_dir: Path) -> TrainConfig:
        return TrainConfig(init=str(init), keep_sparsity=self.keep_sparsity, data=self.data, epochs=self.epochs,
                           lr=self.lr, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                           schedule="cosine", warmup_epochs=0, batch_size=self.batch_size,
                           image_size=self.image_size, amp=self.amp, channels_last=self.channels_last,
                           seed=self.seed + step, device=self.device, threads=self.threads,
                           eval_every=self.epochs, out=str(run_dir))

    @staticmethod
    def _completed(run_dir: Path) -> dict[str, Any] | None:
        summary = run_dir / "summary.json"
        if not summary.is_file() or not (run_dir / "last.safetensors").is_file():
            return None
        try:
            result = json.loads(summary.read_text())
        except (OSError, ValueError):
            return None
        return result if result.get("status") == "completed" else None

    def _optimizer_steps(self, tuned: Checkpoint) -> int:
        train = tuned.meta.get("data", {}).get("train")
        return int(train // self.batch_size * self.epochs) if isinstance(train, int) else 0


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


def _run_steps(ckpt: Checkpoint, method: str, steps: int, target: dict[str, Any], dataset: Any,
               evaluate_split: str | None, tuner: FineTuner | None, log: Log) -> dict[str, Any]:
    """Prune (and fine-tune) in ``steps`` steps; the final model, the checkpoint it follows, history, plan, notes."""
    from convforge.measure import count_macs, count_params

    input_size = ckpt.input_size
    macs0, params0 = count_macs(ckpt.model, input_size), count_params(ckpt.model)
    model, current = ckpt.model, ckpt  # current: whose classes and normalisation `model` follows
    history: list[dict[str, Any]] = []
    plan: list[dict[str, Any]] = []
    notes: list[str] = []
    for step in range(1, steps + 1):
        saved = tuner.saved_step(step) if tuner is not None else None
        if saved is not None:
            entry, plan, notes = saved
            log(f"step {step}/{steps}: pruned by an earlier try ({tuner.pruned_path(step)})")  # type: ignore[union-attr]
        else:
            kwargs = _step_target(method, step, steps, model, input_size, macs0, target["target_macs"],
                                  target["sparsity"])
            result = prune(model, input_size, method, min_share=target["min_share"], round_to=target["round_to"],
                           seed=target["seed"] + step, **kwargs)
            model, plan, notes = result.model, result.plan, result.notes
            entry = {"step": step, "macs": result.macs_after, "params": result.params_after}
            log(f"step {step}/{steps}: {method} -> {result.macs_after / macs0:.3f} of the MACs, "
                f"{result.params_after / params0:.3f} of the parameters")
            if dataset is not None and evaluate_split:
                entry["top1_pruned"] = top1(model, current, dataset, evaluate_split)
                log(f"  pruned, before fine-tuning: top-1 {entry['top1_pruned']:.2f}%")
            if tuner is not None:
                tuner.save_step(step, model, _pruned_meta(ckpt, model, method, current.classes), entry, result)
        if tuner is not None:
            current, entry["finetune"] = tuner.run(step, tuner.pruned_path(step), log)
            model = current.model.eval()
            if evaluate_split:
                entry["top1_finetuned"] = top1(model, current, dataset, evaluate_split)
                log(f"  fine-tuned: top-1 {entry['top1_finetuned']:.2f}%")
        history.append(entry)
    model.eval()
    return {"model": model, "classes": list(current.classes), "history": history, "plan": plan, "notes": notes,
            "macs_before": macs0, "params_before": params0}


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
    device: str = "auto",
    threads: int | None = None,
    work_dir: str | Path | None = None,
    quiet: bool = False,
    log: Log = _echo,
) -> dict[str, Any]:
    """What ``convforge prune`` does; returns a JSON-able report (and writes the pruned checkpoint).

    Data for fine-tuning and evaluation is loaded at the checkpoint's input size. With
    ``finetune_epochs``, each of the ``steps`` prune steps is followed by ``finetune_epochs / steps``
    epochs on the training engine (see :class:`FineTuner`); that must be a whole number (the engine
    trains whole epochs), else a ConfigError names both values. The runs live in ``work_dir``
    (default ``OUT.finetune/``, one ``step-K/`` run each); running the same command again after a
    crash reuses the finished steps and resumes the unfinished one. ``quiet``: the engine prints nothing.
    """
    ckpt = load_checkpoint(checkpoint)
    input_size = ckpt.input_size
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    epochs = epochs_per_step(finetune_epochs, steps) if finetune_epochs > 0 else 0
    target = {"target_macs": target_macs, "sparsity": sparsity, "min_share": min_share, "round_to": round_to,
              "seed": seed}
    # A dry run, and the check that the whole target is reachable, come before any data loading or fine-tuning.
    checked = prune(ckpt.model, input_size, method, dry_run=True, **target)
    if dry_run:
        return {"checkpoint": str(ckpt.path), "dry_run": True, **checked.as_dict()}
    out_path = Path(out) if out else default_output(ckpt.path, method)
    spec = data or ckpt.meta.get("data", {}).get("spec")
    if epochs and input_size[1] != input_size[2]:
        raise ConfigError(f"{ckpt.path} takes {input_size[1]}x{input_size[2]} inputs, but fine-tuning on the "
                          "training engine trains on square images: fine-tune it with convforge train --init")
    dataset = _load_data(spec, ckpt, needed=bool(epochs or data))
    tuner = None
    if epochs:
        tuner = FineTuner(Path(work_dir) if work_dir else default_work_dir(out_path), spec, epochs, lr, batch_size,
                          image_size=input_size[1], keep_sparsity=method == "global-magnitude", seed=seed, amp=amp,
                          channels_last=channels_last, device=device, threads=threads, quiet=quiet)
        tuner.check_work_dir({"checkpoint": str(ckpt.path.resolve()), "modified": ckpt.path.stat().st_mtime_ns,
                              "method": method, **target, "steps": steps, "finetune_epochs": finetune_epochs,
                              "data": spec, "lr": lr, "batch_size": batch_size, "amp": amp})
    report: dict[str, Any] = {"checkpoint": str(ckpt.path), "method": method, "target_macs": target_macs,
                              "sparsity_target": sparsity, "steps": steps, "finetune_epochs": finetune_epochs}
    if dataset is not None and evaluate_split:
        report["top1_before"] = top1(ckpt.model, ckpt, dataset, evaluate_split)
        log(f"unpruned: top-1 {report['top1_before']:.2f}% on {evaluate_split}")
    pruned = _run_steps(ckpt, method, steps, target, dataset, evaluate_split, tuner, log)
    report["output"] = str(_save_output(report, pruned, ckpt, method, evaluate_split, out_path, tuner))
    return report


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
                                               "macs_before", "macs_after", "params_before", "params_after")}
    meta["compress"]["source"] = str(ckpt.path)
    if tuner is not None:
        meta["compress"]["finetune_runs"] = str(tuner.work_dir)
    if final_top1 is not None:
        meta["metrics"] = {f"{evaluate_split}_top1": final_top1}
    return save_checkpoint(out_path, model, meta)
