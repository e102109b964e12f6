"""The ``convforge`` command line: train, eval, predict, models; bench, export, quantize, prune (deploy_cli);
segment, upscale (dense_cli); filters (inspect); report."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Sequence

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
    ("--schedule", "schedule", str, "onecycle, cosine, constant or step (/10 at 50%% and 75%%) (default: onecycle)"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warm-up length (default: 15%% of epochs, at most 2)"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing (default: 0)"),
    ("--weight-decay", "weight_decay", float, "weight decay, not applied to norm and bias parameters (default: 5e-4 sgd, 0.05 adamw)"),
    ("--grad-clip", "grad_clip", float, "clip the gradient norm to this value (default: off)"),
    ("--nan-policy", "nan_policy", str, "on a NaN/inf loss or gradient: stop (default) or skip-batch"),
    ("--mixup", "mixup_alpha", float, "mixup with Beta(a, a) mixing weights (default: 0, off)"),
    ("--cutmix", "cutmix_alpha", float, "CutMix with Beta(a, a) box areas (default: 0, off; with --mixup: one of the two per batch)"),
    ("--random-erasing", "random_erasing", float, "probability of erasing a random rectangle per image (default: 0)"),
    ("--drop-path", "drop_path", float, "stochastic depth rate of the last block, linear in depth (models with drop_path_rate)"),
    ("--teacher", "teachers", "append", "distil from this convforge checkpoint (repeatable: soft targets averaged)"),
    ("--teacher-model", "teacher_model", str, "distil from a foreign weight file: the teacher's model name"),
    ("--teacher-weights", "teacher_weights", str, "distil from a foreign weight file: the file (.pth/.th, weights_only)"),
    ("--teacher-mean", "teacher_mean", "floats", "normalisation mean of the foreign teacher (default: the data's)"),
    ("--teacher-std", "teacher_std", "floats", "normalisation std of the foreign teacher (default: the data's)"),
    ("--kd-alpha", "kd_alpha", float, "weight of the distillation loss (default: 0.5)"),
    ("--kd-temperature", "kd_temperature", float, "distillation temperature (default: 4)"),
    ("--kd-consistent", "kd_consistent", "flag", "teacher sees the student's augmented view (default: the clean image)"),
    ("--eval-tta", "eval_tta", "flag", "evaluate with flip test-time augmentation"),
    ("--filter-health", "filter_health", "flag", "per-epoch 3x3 filter metrics in metrics.jsonl; warn when a layer degenerates"),
    ("--report", "report", "flag", "write RUN_DIR/report.html when training ends (see `convforge report`)"),
    ("--tensorboard", "tensorboard", "flag", "also log epochs to RUN_DIR/tensorboard (needs the tensorboard package)"),
    ("--recipe", "recipe", str, "start from a named recipe (`convforge recipes`); other options override it"),
    ("--ema", "ema", "flag", "evaluate and save an exponential moving average of the weights"),
    ("--ema-decay", "ema_decay", float, "EMA decay (default: 0.999)"),
    ("--augment", "augment", str, "none, flip, crop or crop-flip; segment: also scale-crop-flip (default: per dataset)"),
    ("--crop-padding", "crop_padding", int, "padding of the random crop (default: image size / 8)"),
    ("--image-size", "image_size", int, "resize image folders to this size (default: their own size)"),
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


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress goes to stderr)")


def build_parser() -> argparse.ArgumentParser:
    from convforge.version import __version__

    parser = argparse.ArgumentParser(prog="convforge", description="Convolutional networks for images: train, evaluate, predict.")
    parser.add_argument("--version", action="version", version=f"convforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser("train", help="train a model (no arguments: the small CNN on scikit-learn's digits)",
                           description="Train a model. Options may also come from --config FILE.yaml; "
                                       "command-line options win over the file.")
    train.add_argument("--config", help="YAML file of options (keys as below, with _ or -)")
    for option, field, kind, help_text in TRAIN_OPTIONS:
        if kind == "flag":
            train.add_argument(option, dest=field, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif kind == "append":
            train.add_argument(option, dest=field, action="append", default=argparse.SUPPRESS, help=help_text)
        elif kind == "floats":
            train.add_argument(option, dest=field, type=float, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            train.add_argument(option, dest=field, type=kind, default=argparse.SUPPRESS, help=help_text)
    train.add_argument("--nproc-per-node", type=int, metavar="N",
                       help="train with N processes on this machine (DistributedDataParallel via torch.distributed.run; "
                            "for several machines use torchrun directly, see the README)")
    train.add_argument("--model-arg", dest="model_args", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                       help="extra model argument (value parsed as YAML), repeatable")
    _add_json(train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint or a foreign weight file",
                        description="Evaluate a checkpoint (CKPT) or a foreign weight file (--model NAME --weights FILE): "
                                    "top-1, top-5, per-class accuracy, confusion matrix.")
    ev.add_argument("checkpoint", nargs="?", metavar="CKPT", help="checkpoint .safetensors, its .json, or a run directory")
    ev.add_argument("--data", help="data spec (default: the checkpoint's own data)")
    ev.add_argument("--split", default="test", choices=("test", "val", "train"), help="split to evaluate (default: test)")
    ev.add_argument("--tta", action="store_true", help="average predictions over the image and its mirror")
    ev.add_argument("--model", help="model name, for --weights")
    ev.add_argument("--weights", help="foreign weight file (.pth/.th/.pt, loaded with weights_only=True, or .safetensors)")
    ev.add_argument("--num-classes", type=int, help="classes of the foreign model (default: the data's)")
    ev.add_argument("--in-chans", type=int, help="input channels of the foreign model (default: the registry's)")
    ev.add_argument("--model-arg", dest="model_args", action="append", default=[], metavar="KEY=VALUE",
                    help="extra argument of the foreign model (value parsed as YAML), repeatable")
    ev.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel on [0, 1] (foreign weights)")
    ev.add_argument("--std", type=float, nargs="+", help="normalisation std per channel on [0, 1] (foreign weights)")
    ev.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default: 256)")
    ev.add_argument("--image-size", type=int, help="resize image folders to this size")
    ev.add_argument("--skip-bad-images", action="store_true", help="skip undecodable images with a warning")
    _add_json(ev)

    pr = sub.add_parser("predict", help="top-k classes of images", description="Predict the classes of image files.")
    pr.add_argument("checkpoint", metavar="CKPT", help="checkpoint .safetensors, its .json, or a run directory")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    pr.add_argument("--top-k", type=int, default=5, help="classes to show per image (default: 5)")
    pr.add_argument("--tta", action="store_true", help="average predictions over the image and its mirror")
    _add_json(pr)

    mo = sub.add_parser("models", help="list registered models with params and MACs",
                        description="List registered models; params and MACs are measured at the default input size.")
    mo.add_argument("pattern", nargs="?", help="wildcard (resnet*) or substring filter")
    _add_json(mo)

    re_ = sub.add_parser("recipes", help="list the named training recipes (--recipe NAME) with their sources",
                         description="List the training recipes shipped with convforge; `convforge recipes NAME` "
                                     "shows one recipe's options.")
    re_.add_argument("name", nargs="?", help="show this recipe's options")
    _add_json(re_)

    from convforge.deploy_cli import add_parsers

    add_parsers(sub, _add_json)  # bench, export, quantize, prune

    from convforge.dense_cli import add_parsers as add_dense_parsers

    add_dense_parsers(sub, _add_json)  # segment, upscale

    from convforge.report.command import add_parser as add_report_parser

    add_report_parser(sub, _add_json)  # report

    from convforge.inspect.command import add_parser as add_filters_parser

    add_filters_parser(sub, _add_json)  # filters
    return parser


# ---------------------------------------------------------------- commands


def _train_config(args: argparse.Namespace):
    from convforge.config import TrainConfig, coerce_fields, load_yaml

    values: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    explicit = {f: getattr(args, f) for _, f, _, _ in TRAIN_OPTIONS if hasattr(args, f)}
    if hasattr(args, "model_args"):
        explicit["model_args"] = {**values.get("model_args", {}), **_parse_model_args(args.model_args)}
    values.update(coerce_fields(explicit, "command line"))
    config = TrainConfig(**values)
    config.explicit_fields = set(values)  # type: ignore[attr-defined]  (a recipe fills only the others)
    return config


def _parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    parsed: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConvforgeError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            parsed[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConvforgeError(f"--model-arg {item!r}: the value is not valid YAML ({exc})") from None
    return parsed


def _launch_processes(nproc: int, argv: Sequence[str]) -> int:
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


def cmd_train(args: argparse.Namespace) -> dict[str, Any] | None:
    from convforge.train import train
    from convforge.train.rundir import ProcessRole

    summary = train(_train_config(args))
    if not ProcessRole.from_env().is_main:
        return None
    if not args.json:
        _print_table("run summary", [
            ("test top-1", f"{summary['test_top1']:.2f}%"),
            ("test top-5", f"{summary['test_top5']:.2f}%"),
            ("best", f"{summary['best_top1']:.2f}% at epoch {summary['best_epoch']} (selected on {summary['best_selected_on']})"),
            ("params", f"{summary['params']:,}"),
            ("MACs", f"{summary['macs'] / 1e6:.2f} M"),
            ("wall time", f"{summary['wall_time_s']:.1f} s (training {summary['train_time_s']:.1f} s, {summary['images_per_s']:.0f} img/s)"),
            ("run dir", summary["run_dir"]),
        ])
    return summary


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.models import create_model, load_foreign_weights
    from convforge.predict import evaluate_model, load_data_for
    from convforge.train import load_checkpoint

    if args.checkpoint and (args.weights or args.model):
        raise ConvforgeError("give either CKPT or --model NAME --weights FILE, not both")
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        if ckpt.meta.get("task", "classify") != "classify":
            from convforge.dense_cli import evaluate_dense, print_dense

            result = evaluate_dense(ckpt, args.data, args.split, args.batch_size)
            if not args.json:
                print_dense(result)
            return result
        spec = args.data or ckpt.meta.get("data", {}).get("spec")
        if not spec:
            raise ConvforgeError("the checkpoint names no data; pass --data SPEC")
        data = load_data_for(spec, args.image_size, args.skip_bad_images)
        mean = tuple(args.mean) if args.mean else ckpt.mean
        std = tuple(args.std) if args.std else ckpt.std
        result = evaluate_model(ckpt.model, ckpt.classes, mean, std, ckpt.input_size[0], data, args.split,
                                args.tta, args.batch_size)
        result["checkpoint"] = str(ckpt.path)
        result["model"] = ckpt.meta["model"]["name"]
    else:
        if not (args.model and args.weights):
            raise ConvforgeError("give a checkpoint (CKPT), or --model NAME and --weights FILE")
        if not args.data:
            raise ConvforgeError("foreign weights need --data SPEC")
        data = load_data_for(args.data, args.image_size, args.skip_bad_images)
        from convforge.models import model_info

        in_chans = args.in_chans or model_info(args.model).input_size[0]
        model = create_model(args.model, num_classes=args.num_classes or data.num_classes, in_chans=in_chans,
                             **_parse_model_args(args.model_args))
        load_foreign_weights(model, args.weights)
        if (args.mean is None) != (args.std is None):
            raise ConvforgeError("give both --mean and --std, or neither")
        notes = []
        if args.mean is None:
            mean, std = data.mean, data.std
            if len(mean) != in_chans:
                mean, std = (mean * in_chans)[:in_chans], (std * in_chans)[:in_chans]
            notes.append("no --mean/--std given: using the statistics measured on this data's train split; "
                         "foreign weights usually expect the normalisation they were trained with")
        else:
            mean, std = tuple(args.mean), tuple(args.std)
        classes = data.classes if not args.num_classes or args.num_classes == data.num_classes else \
            [str(i) for i in range(args.num_classes)]
        result = evaluate_model(model, classes, mean, std, in_chans, data, args.split, args.tta, args.batch_size)
        result["notes"] = notes + result["notes"]
        result["weights"] = args.weights
        result["model"] = args.model
    if not args.json:
        _print_eval(result)
    return result


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.predict import predict_images
    from convforge.train import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    predictions = predict_images(ckpt, args.images, args.top_k, args.tta)
    if not args.json:
        for item in predictions:
            best = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in item["top"])
            print(f"{item['image']}: {best}")
    return {"checkpoint": str(ckpt.path), "predictions": predictions}


def cmd_models(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from convforge.measure import count_macs, count_params
    from convforge.models import create_model, list_models, model_info

    from convforge.progress import progress_iter

    rows = []
    names = list_models(args.pattern)
    for name in progress_iter(names, len(names), "measuring params and MACs"):
        info = model_info(name)
        with torch.device("meta"):
            model = create_model(name)
        row = info.as_dict()
        row.update({"params": count_params(model), "macs": count_macs(model, info.input_size)})
        rows.append(row)
    if not args.json:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(rows)} model(s)" + (f" matching {args.pattern!r}" if args.pattern else ""))
        numeric = ("params", "MACs", "published params", "published MACs", "published top-1")
        for column in ("name", "family", "input", *numeric, "paper"):
            table.add_column(column, justify="right" if column in numeric else "left")
        for r in rows:
            table.add_row(r["name"], r["family"], "x".join(map(str, r["input_size"])), f"{r['params'] / 1e6:.3f} M",
                          f"{r['macs'] / 1e6:.1f} M",
                          f"{r['published_params'] / 1e6:.3f} M" if r["published_params"] else "-",
                          f"{r['published_macs'] / 1e6:.1f} M" if r["published_macs"] else "-",
                          f"{r['published_top1']:.2f}%" if r["published_top1"] else "-",
                          f"{r['paper']} ({r['year']})" if r["paper"] else "-")
        Console(width=None if sys.stdout.isatty() else 160).print(table)
    return {"models": rows}


def _print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    Console(soft_wrap=True).print(table)


def _print_eval(result: dict[str, Any]) -> None:
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


def cmd_recipes(args: argparse.Namespace) -> dict[str, Any]:
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


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "models": cmd_models,
            "recipes": cmd_recipes}


def _deploy_command(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.deploy_cli import COMMANDS as deploy

    return deploy[args.command](args)


COMMANDS.update({name: _deploy_command for name in ("bench", "export", "quantize", "prune")})


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.report.command import run

    return run(args)


COMMANDS["report"] = cmd_report


def _dense_command(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.dense_cli import COMMANDS as dense

    return dense[args.command](args)


COMMANDS.update({name: _dense_command for name in ("segment", "upscale")})


def cmd_filters(args: argparse.Namespace) -> dict[str, Any]:
    from convforge.inspect.command import run

    return run(args)


COMMANDS["filters"] = cmd_filters


def _raise_interrupt(signum: int, frame: Any) -> None:
    from convforge.train import TrainingInterrupted

    raise TrainingInterrupted(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convforge`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from convforge.train import TrainingInterrupted

    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if getattr(args, "nproc_per_node", None) and "TORCHELASTIC_RUN_ID" not in os.environ:
            return _launch_processes(args.nproc_per_node, argv)
        result = COMMANDS[args.command](args)
    except ConvforgeError as exc:
        print(f"convforge {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingInterrupted as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False) and result is not None:
        try:
            print(json.dumps(result), flush=True)
        except BrokenPipeError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
