"""``convforge train`` and ``convforge recipes``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from convforge.cli.common import Command, add_json, parse_model_args, print_table
from convforge.errors import ConvforgeError

# (option, config field, type or "flag", help). Every option is also a key of the YAML config.
TRAIN_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "model name from `convforge models` (default: smallcnn)"),
    ("--data", "data", str, "data spec: digits, synthetic[:k=v,...], mnist:DIR, cifar10:DIR, imagefolder:DIR; "
                            "segfolder:DIR (--task segment); superres:DIR (--task super-resolve) (default: digits)"),
    ("--task", "task", str, "classify (default), segment or super-resolve"),
    ("--scale", "scale", int, "super-resolve: upscaling factor 2, 3 or 4 (default: 3)"),
    ("--dice-weight", "dice_weight", float, "segment: weight of the soft Dice loss added to cross-entropy (default: 0)"),
    ("--seg-crop", "seg_crop", "floats", "segment: training crop HEIGHT WIDTH (default: the image size)"),
    ("--seg-scales", "seg_scales", "floats", "segment: random scale range LOW HIGH of scale-crop-flip (default: 0.5 2.0)"),
    ("--epochs", "epochs", int, "number of epochs (default: 15)"),
    ("--batch-size", "batch_size", int, "batch size per process (default: 64)"),
    ("--lr", "lr", float, "peak learning rate (default: 0.1*batch/128 for sgd, 2e-3*batch/128 for adamw)"),
    ("--optimizer", "optimizer", str, "sgd (Nesterov momentum) or adamw (default: sgd)"),
    ("--momentum", "momentum", float, "SGD momentum (default: 0.9)"),
    ("--schedule", "schedule", str, "onecycle, cosine, constant, step (/10 at 50%% and 75%%) or triangle (0.2 -> 1 "
     "over the warm-up -> 0.07 x lr, airbench94's) (default: onecycle)"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warm-up length (default: 15%% of epochs, at most 2; triangle: 23%%)"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing (default: 0)"),
    ("--weight-decay", "weight_decay", float, "weight decay, not applied to norm and bias parameters (default: 5e-4 sgd, 0.05 adamw)"),
    ("--decay-all", "decay_all", "flag", "apply weight decay to biases and norm parameters too (airbench94)"),
    ("--norm-lr-scale", "norm_lr_scale", float, "multiply the learning rate of norm layers' parameters by F and "
     "divide their weight decay by F (airbench94: 64) (default: 1)"),
    ("--grad-clip", "grad_clip", float, "clip the gradient norm to this value (default: off)"),
    ("--nan-policy", "nan_policy", str, "on a NaN/inf loss or gradient: stop (default) or skip-batch"),
    ("--mixup", "mixup_alpha", float, "mixup with Beta(a, a) mixing weights (default: 0, off)"),
    ("--cutmix", "cutmix_alpha", float, "CutMix with Beta(a, a) box areas (default: 0, off; with --mixup: one of the two per batch)"),
    ("--random-erasing", "random_erasing", float, "probability of erasing a random rectangle per image (default: 0)"),
    ("--drop-path", "drop_path", float, "stochastic depth rate of the last block, linear in depth (models with drop_path_rate)"),
    ("--adv-train", "adv_train", str, "adversarial training: pgd (Madry et al.), fgsm-rs (Wong et al. 2020, "
                                      "'Fast is better than free'), trades (Zhang et al.) or none (default: none)"),
    ("--adv-eps", "adv_eps", "fraction", "adversarial training: Linf radius on the [0, 1] pixel scale, e.g. 8/255 "
                                         "(default: 8/255)"),
    ("--adv-steps", "adv_steps", int, "adversarial training: attack steps (default: pgd 7, fgsm-rs 1, trades 10)"),
    ("--adv-step-size", "adv_step_size", "fraction", "adversarial training: attack step, e.g. 2/255 (default: pgd "
                                                     "2/255, fgsm-rs 10/255, trades 2/255, scaled with --adv-eps)"),
    ("--adv-beta", "adv_beta", float, "TRADES's weight of the robustness (KL) term (default: 6)"),
    ("--adv-eval-samples", "adv_eval_samples", int, "with --adv-train: PGD-10 accuracy at --adv-eps on this many "
                                                    "seeded test images after each evaluation (default: 1000; 0: off)"),
    ("--qat", "qat", str, "quantization-aware training: int8 (per-channel int8 weights, uint8 activations, BatchNorm "
                          "folded; with --init CKPT and a small --lr) or none (default: none)"),
    ("--qat-freeze-bn-fraction", "qat_freeze_bn_fraction", float, "with --qat: freeze the BatchNorm statistics after "
                                                                  "this share of the epochs (default: 0.5; 1: never)"),
    ("--binary", "binary", str, "binary network: weights, weights+activations or activations (real weights: the "
                                "first of two steps, then --init it with weights+activations); first and last layer "
                                "full precision; or none (default: none)"),
    ("--binary-method", "binary_method", str, "with --binary: xnor (scale mean|W| per output channel, XNOR-Net) or "
                                              "dorefa (one scale per layer, DoReFa-Net) (default: xnor)"),
    ("--binary-shortcuts", "binary_shortcuts", "flag", "with binary activations: a real-valued shortcut "
                                                       "around every binary convolution (Bi-Real Net)"),
    ("--binary-ste", "binary_ste", str, "with binary activations: the sign's straight-through gradient, clipped "
                                        "(|x| < 1, default) or scaled (|x| < the channel's standard deviation, "
                                        "as with a BatchNorm before the sign)"),
    ("--binary-react", "binary_react", "flag", "with --binary-shortcuts: ReActNet's activations, a learnable "
                                               "threshold per channel before each sign (RSign) and RPReLU on the "
                                               "real-valued path"),
    ("--teacher", "teachers", "append", "distil from this convforge checkpoint (repeatable: soft targets averaged)"),
    ("--teacher-model", "teacher_model", str, "distil from a foreign weight file: the teacher's model name"),
    ("--teacher-weights", "teacher_weights", str, "distil from a foreign weight file: the file (.pth/.th, weights_only)"),
    ("--teacher-mean", "teacher_mean", "floats", "normalisation mean of the foreign teacher (default: the data's)"),
    ("--teacher-std", "teacher_std", "floats", "normalisation std of the foreign teacher (default: the data's)"),
    ("--kd-alpha", "kd_alpha", float, "weight of the distillation loss (default: 0.5)"),
    ("--kd-temperature", "kd_temperature", float, "distillation temperature (default: 4)"),
    ("--kd-consistent", "kd_consistent", "flag", "teacher sees the student's augmented view (default: the clean image)"),
    ("--eval-tta", "eval_tta", "flag", "evaluate with flip test-time augmentation (alias: --tta)"),
    ("--eval-tta-shift", "eval_tta_shift", int, "with --eval-tta: also average the flip TTA of the images shifted by "
     "N pixels up-left and down-right (airbench94's level 2: N=1) (default: 0)"),
    ("--filter-health", "filter_health", "flag", "per-epoch 3x3 filter metrics in metrics.jsonl; warn when a layer degenerates"),
    ("--report", "report", "flag", "write RUN_DIR/report.html when training ends (see `convforge report`)"),
    ("--tensorboard", "tensorboard", "flag", "also log epochs to RUN_DIR/tensorboard (needs the tensorboard package)"),
    ("--recipe", "recipe", str, "start from a named recipe (`convforge recipes`); other options override it"),
    ("--ema", "ema", "flag", "evaluate and save an exponential moving average of the weights"),
    ("--ema-decay", "ema_decay", float, "EMA decay (default: 0.999)"),
    ("--lookahead", "lookahead", "flag", "airbench94's Lookahead: every 5 steps pull the weights to a slow copy "
     "(decay 0.95^5 x (t/T)^3); the slow copy is evaluated and saved"),
    ("--augment", "augment", str, "none, flip, crop, crop-flip or crop-altflip (alternating flip, airbench94); store data (--store-size): rrc-flip, rrc-flip-ta "
                                   "(TrivialAugment), rrc-flip-ra (RandAugment) or center; segment: also "
                                   "scale-crop-flip (default: per dataset)"),
    ("--crop-padding", "crop_padding", int, "padding of the random crop (default: image size / 8)"),
    ("--pad-mode", "pad_mode", str, "padding of the random crop: zeros or reflect (default: zeros)"),
    ("--image-size", "image_size", "sizes", "N or H W: resize image folders to this size (default: their own "
                                             "size); with --store-size: the training crop (default: 128)"),
    ("--store-size", "store_size", "int-or-auto",
     "imagefolder:DIR of any image sizes: keep the images (shorter side <= N) in an image store (wds:DIR shards: "
     "decode them so); auto: the larger of the training crop and the evaluation resize (128 -> 146, 224 -> 256); "
     "--image-size is then the training crop (and the evaluation crop unless --eval-image-size)"),
    ("--crop-pct", "crop_pct", float, "store data: evaluation resizes to eval image size / F, then centre-crops "
                                      "(default: 0.875)"),
    ("--interpolation", "interpolation", str, "store data: the evaluation resize filter, bilinear or bicubic "
                                              "(antialiased; default: bilinear, or the --init model's pretrained "
                                              "preprocessing); checkpoints record it"),
    ("--eval-image-size", "eval_image_size", "sizes", "store data: N or H W, the evaluation crop (FixRes; default: "
                                                      "--image-size); checkpoints record it"),
    ("--rrc-scale", "rrc_scale", "floats", "store data: RandomResizedCrop area range LOW HIGH (default: 0.08 1.0)"),
    ("--rrc-ratio", "rrc_ratio", "floats", "store data: RandomResizedCrop aspect-ratio (w/h) range LOW HIGH "
                                           "(default: 3/4 4/3)"),
    ("--randaugment", "randaugment", "ints", "with --augment rrc-flip-ra: RandAugment's ops per image N and "
                                             "magnitude M in 0..30 (default: 2 9)"),
    ("--progressive-resize", "progressive_resize", "ints", "store data: S E0 E1: train at crop S up to epoch E0, "
                                                           "growing linearly to --image-size at epoch E1 (rounded to "
                                                           "multiples of 32, 16 or 8); evaluation at its own size"),
    ("--skip-bad-images", "skip_bad_images", "flag", "skip undecodable images with a warning instead of stopping"),
    ("--amp", "amp", "flag", "bfloat16 autocast (GPU; opt-in on CPU)"),
    ("--channels-last", "channels_last", "flag", "channels_last memory format"),
    ("--compile", "compile", "flag", "torch.compile the model"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N (default: auto)"),
    ("--threads", "threads", int, "CPU threads for PyTorch (default: PyTorch's choice)"),
    ("--sync-bn", "sync_bn", "flag", "distributed runs: BatchNorm statistics over the global batch"),
    ("--dist-timeout", "dist_timeout", float, "distributed runs: seconds a collective may wait (default: 1800)"),
    ("--seed", "seed", int, "random seed (default: 0)"),
    ("--eval-every", "eval_every", int, "evaluate every N epochs (default: 1)"),
    ("--save-every-steps", "save_every_steps", int, "also save the resume state every N steps (default: 0, epoch ends only)"),
    ("--out", "out", str, "run directory (default: runs/MODEL-DATA-TIME)"),
    ("--resume", "resume", str, "resume the run in RUN_DIR from its last saved state"),
    ("--keep-sparsity", "keep_sparsity", "flag", "with --init: hold the checkpoint's zero conv/linear weights at "
                                                 "zero (fine-tuning a global-magnitude pruned model)"),
    ("--init", "init", str, "start from this convforge checkpoint's weights (fine-tuning; model, widths and "
                            "normalisation from it; a fresh head when the classes differ)"),
    ("--cache-dir", "cache_dir", str, "decoded-image cache (default: $CONVFORGE_CACHE or ~/.cache/convforge)"),
]

ALIASES = {"--eval-tta": ("--tta",)}  # train's --eval-tta is the --tta of the other commands


def add_train_arguments(train: argparse.ArgumentParser) -> None:
    """The options of ``convforge train`` (each also a key of the YAML config)."""
    train.add_argument("--config", help="YAML file of options (keys as below, with _ or -)")
    for option, field, kind, help_text in TRAIN_OPTIONS:
        names = (option, *ALIASES.get(option, ()))
        if kind == "flag":
            train.add_argument(*names, dest=field, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        elif kind == "append":
            train.add_argument(*names, dest=field, action="append", default=argparse.SUPPRESS, help=help_text)
        elif kind == "floats":
            train.add_argument(*names, dest=field, type=float, nargs="+", default=argparse.SUPPRESS, help=help_text)
        elif kind == "fraction":  # 8/255 or 0.0314
            train.add_argument(*names, dest=field, type=_fraction, default=argparse.SUPPRESS, help=help_text,
                               metavar="X")
        elif kind in ("ints", "sizes"):  # sizes: N or H W (one number stays a number in the config)
            train.add_argument(*names, dest=field, type=int, nargs="+", default=argparse.SUPPRESS, help=help_text,
                               metavar="N")
        elif kind == "int-or-auto":
            train.add_argument(*names, dest=field, type=_int_or_auto, default=argparse.SUPPRESS, help=help_text,
                               metavar="N|auto")
        else:
            train.add_argument(*names, dest=field, type=kind, default=argparse.SUPPRESS, help=help_text)
    train.add_argument("--nproc-per-node", type=int, metavar="N",
                       help="train with N processes on this machine (DistributedDataParallel via torch.distributed.run; "
                            "for several machines use torchrun directly, see the README)")
    train.add_argument("--model-arg", dest="model_args", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                       help="extra model argument (value parsed as YAML), repeatable")
    add_json(train)


def _int_or_auto(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def _fraction(text: str) -> float:
    from convforge.measure.attacks import parse_eps

    try:
        return parse_eps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def train_config(args: argparse.Namespace):
    """The TrainConfig of a parsed ``convforge train`` command line (--config file first, options over it)."""
    from convforge.config import TrainConfig, coerce_fields, load_yaml

    values: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    explicit = {f: getattr(args, f) for _, f, _, _ in TRAIN_OPTIONS if hasattr(args, f)}
    if hasattr(args, "model_args"):
        explicit["model_args"] = {**values.get("model_args", {}), **parse_model_args(args.model_args)}
    values.update(coerce_fields(explicit, "command line"))
    config = TrainConfig(**values)
    config.explicit_fields = set(values)  # type: ignore[attr-defined]  (a recipe fills only the others)
    return config


def launch_processes(nproc: int, argv: Sequence[str]) -> int:
    """Re-run this ``convforge train`` command as ``nproc`` processes under torch.distributed.run."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ConvforgeError(f"--nproc-per-node must be >= 1, got {nproc}")
    forwarded, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc-per-node":
            skip = True
        elif not item.startswith("--nproc-per-node="):
            forwarded.append(item)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    launcher = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "convforge", *forwarded])
    try:
        run(launcher)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        first_rank = min(codes)
        code = codes[first_rank]
        code = 128 - code if code < 0 else code  # killed by signal -k: report 128+k like a shell
        print(f"convforge train: error: process(es) {sorted(codes)} of {nproc} failed "
              f"(rank {first_rank} exit code {code}); see the messages above", file=sys.stderr)
        return code or 1
    return 0


def run_train(args: argparse.Namespace) -> dict[str, Any] | None:
    """``convforge train``: :func:`convforge.api.fit` and a summary table of the task's metrics."""
    from convforge.api import fit
    from convforge.train.rundir import ProcessRole

    summary = fit(train_config(args))
    if not ProcessRole.from_env().is_main:
        return None
    if not args.json:
        print_table("run summary", summary_rows(summary))
    return summary


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of the run summary table: the task's test metrics, the best epoch, size and time."""
    task = summary.get("task") or "classify"
    best_metric = summary.get("best_metric") or "test_top1"
    primary = best_metric.rsplit("_", 1)[-1] if "_" in best_metric else "top1"
    metrics = summary.get("metrics") or {}
    rows: list[tuple[str, str]] = []
    if task == "classify" and summary.get("test_top1") is not None:
        rows += [("test top-1", f"{summary['test_top1']:.2f}%"), ("test top-5", f"{summary['test_top5']:.2f}%")]
    else:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("train_"):
                rows.append((key.replace("_", " "), _metric(key, value)))
    best = summary.get("best_top1") if task == "classify" else summary.get("best_score")
    if best is not None:
        rows.append(("best", f"{_metric(primary, best)} at epoch {summary.get('best_epoch')} "
                             f"(selected on {summary.get('best_selected_on')})"))
    rows += [("params", f"{summary['params']:,}"), ("MACs", f"{summary['macs'] / 1e6:.2f} M"),
             ("wall time", f"{summary['wall_time_s']:.1f} s (training {summary['train_time_s']:.1f} s, "
                           f"{summary['images_per_s']:.0f} img/s)"),
             ("run dir", summary["run_dir"])]
    return rows


def _metric(key: str, value: float) -> str:
    if key.endswith(("top1", "top5", "miou", "pixel_acc", "mean_acc")):
        return f"{value:.2f}%"
    if key.endswith(("psnr",)):
        return f"{value:.2f} dB"
    return f"{value:.4f}"


def run_recipes(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge recipes [NAME]``: the named training recipes, or one recipe's options."""
    from convforge.recipes import list_recipes, recipe

    chosen = [recipe(args.name)] if args.name else list_recipes()
    if not args.json:
        from rich.console import Console

        console = Console(soft_wrap=True)
        for item in chosen:
            console.print(f"[bold]{item['name']}[/bold]: {item['description']}", highlight=False)
            console.print(f"  source: {item['source']}", highlight=False, markup=False)
            if item["notes"]:
                console.print(f"  notes: {item['notes']}", highlight=False, markup=False)
            if args.name:
                for key, value in item["options"].items():
                    console.print(f"  {key}: {value}", highlight=False, markup=False)
    return {"recipes": chosen}


def _add_recipes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show this recipe's options")
    add_json(parser)


COMMANDS = [
    Command("train", "train a model (no arguments: the small CNN on scikit-learn's digits)", add_train_arguments,
            run_train, "Train a model. Options may also come from --config FILE.yaml; command-line options win "
                       "over the file."),
    Command("recipes", "list the named training recipes (--recipe NAME) with their sources", _add_recipes_arguments,
            run_recipes, "List the training recipes shipped with convforge; `convforge recipes NAME` shows one "
                         "recipe's options."),
]
