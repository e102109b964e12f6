"""What every ``convforge`` command shares: the command record, model-source and runtime arguments, tables."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from convforge.errors import ConfigError, ConvforgeError

Run = Callable[[argparse.Namespace], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, longer description, arguments and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Run
    description: str = ""
    raw_description: bool = False


def add_json(parser: argparse.ArgumentParser) -> None:
    """``--json``: one JSON object on stdout."""
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress goes to stderr)")


def add_model_source(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    """The three model sources every model command takes: CKPT, a registry NAME, or --model NAME --weights FILE."""
    if positional:
        parser.add_argument("source", nargs="?", metavar="CKPT|MODEL",
                            help="checkpoint .safetensors, its .json, or a run directory; or a model name from "
                                 "`convforge models` (fresh untrained weights)")
    parser.add_argument("--model", help="model name from `convforge models` (with --weights: foreign weights)")
    parser.add_argument("--weights", help="foreign weight file for --model (.pth/.th/.pt, loaded with "
                                          "weights_only=True, or .safetensors)")
    parser.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel on [0, 1] "
                                                              "(foreign weights; overrides a checkpoint's)")
    parser.add_argument("--std", type=float, nargs="+", help="normalisation std per channel on [0, 1]")
    parser.add_argument("--num-classes", type=int, help="classes of a --model's head (default: the data's or "
                                                        "the registry's)")
    parser.add_argument("--in-chans", type=int, help="input channels of a --model (default: the registry's)")
    parser.add_argument("--model-arg", dest="model_args", action="append", default=[], metavar="KEY=VALUE",
                        help="extra argument of a --model (value parsed as YAML), repeatable")


def add_runtime(parser: argparse.ArgumentParser, *, batch_size: int | str | None = 256, image_size: bool = True,
                tta: bool = True, batch_type: Callable[[str], Any] = int, batch_help: str = "batch size") -> None:
    """--device, --threads, --batch-size (alias --batch), --image-size, --tta and --json (the last four optional)."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    if batch_size is not None:
        parser.add_argument("--batch-size", type=batch_type, default=batch_size,
                            help=f"{batch_help} (default: {batch_size})")
        parser.add_argument("--batch", dest="batch_size", type=batch_type, help=argparse.SUPPRESS)
    if image_size:
        parser.add_argument("--image-size", type=parse_image_size, metavar="N|HxW",
                            help="input size: image folders are resized to it (default: the checkpoint's trained size)")
    if tta:
        parser.add_argument("--tta", action="store_true", help="average predictions over the image and its mirror")
    add_json(parser)


def parse_image_size(text: str) -> int | tuple[int, int]:
    """``N`` or ``HxW`` as an int or a (height, width) pair."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(0 < v <= 8192 for v in values):
        raise argparse.ArgumentTypeError(f"expected N or HxW with sizes in 1..8192, got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def image_pair(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """An ``--image-size`` value as (height, width)."""
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else size


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items (values parsed as YAML) as a dict."""
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


def runtime_device(args: argparse.Namespace) -> str:
    """Apply --threads and resolve --device (``auto``: CUDA when available, else CPU), as ``train`` does."""
    import torch

    from convforge.train.setup import resolve_device

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return str(resolve_device(getattr(args, "device", None) or "auto"))
    except RuntimeError:  # torch.device() of a malformed name
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}") from None


def source_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`convforge.train.inference.load_model` given on the command line."""
    return {"source": getattr(args, "source", None), "model": args.model, "weights": args.weights,
            "mean": args.mean, "std": args.std, "num_classes": args.num_classes, "in_chans": args.in_chans,
            "model_args": parse_model_args(args.model_args), "image_size": getattr(args, "image_size", None)}


def load_source(args: argparse.Namespace, device: str = "cpu", **overrides: Any):
    """The model the command line names (any of the three sources), as a LoadedModel."""
    from convforge.train.inference import load_model

    return load_model(**{**source_kwargs(args), **overrides}, device=device)


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """A two-column key/value table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    Console(soft_wrap=True).print(table)
