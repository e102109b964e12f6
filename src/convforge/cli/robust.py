"""``convforge robust``: accuracy of a classifier under FGSM, PGD and AutoAttack (convforge.robust)."""

from __future__ import annotations

import argparse
from typing import Any

from convforge.cli.common import Command, add_model_source, add_runtime, load_source, runtime_device
from convforge.cli.evaluate import SPLITS
from convforge.errors import ConfigError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source(parser)
    parser.add_argument("--data", help="data spec (default: the checkpoint's own data)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split to draw images from (default: test)")
    parser.add_argument("--samples", type=_positive_int, help="images drawn from the split by --seed (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn images and random starts (default: 0)")
    parser.add_argument("--attack", help="comma-separated attacks: fgsm, pgd, pgd-l2, autoattack (default: pgd, "
                                         "none when only --corruptions is given)")
    parser.add_argument("--eps", default="8/255", help="comma-separated perturbation sizes on the [0, 1] pixel "
                                                       "scale, e.g. 2/255,8/255 or 0.5 (default: 8/255)")
    parser.add_argument("--norm", default="linf", choices=("linf", "l2"), help="threat model (default: linf)")
    parser.add_argument("--steps", type=_positive_int, default=20, help="PGD steps (default: 20)")
    parser.add_argument("--step-size", help="PGD step size, e.g. 2/255 (default: 2.5 * eps / steps)")
    parser.add_argument("--restarts", type=_positive_int, default=1, help="PGD random restarts (default: 1)")
    parser.add_argument("--corruptions", metavar="all|NAME,...", help="also the common corruptions (all 15, or "
                                                                      "names from convforge.data.corruptions)")
    parser.add_argument("--severities", default="1-5", help="corruption severities, e.g. 1-5 or 1,3,5 (default: 1-5)")
    parser.add_argument("--corruption-params", default="auto", choices=("auto", "cifar", "imagenet"),
                        help="corruption parameter table (default: auto: cifar for images up to 64 px)")
    parser.add_argument("--baseline", metavar="CKPT", help="baseline checkpoint scored on the same corrupted images: "
                                                           "CE per corruption, mCE and relative mCE")
    parser.add_argument("--out", help="folder for robust.json, robust-curve.png and the resume file "
                                      "robust-progress.json (a rerun with the same arguments skips finished work)")
    add_runtime(parser, batch_size=128, tta=False, batch_help="images attacked at once (one resumable chunk)")


def _load(args: argparse.Namespace, device: str) -> tuple[Any, Any]:
    """The model and the data (a loaded dataset, or None for the checkpoint's own data), as ``eval`` takes them."""
    from convforge.train.inference import classes_for, is_checkpoint_path, load_data, load_eval_data

    foreign = args.weights or args.model or (args.source and not is_checkpoint_path(args.source))
    if foreign and not args.data:
        raise ConfigError("foreign weights need --data SPEC" if args.weights else
                          "a registry model has no data of its own: pass --data SPEC")
    overrides: dict[str, Any] = {}
    data = None
    if foreign:
        data = load_data(args.data, args.image_size)
        overrides = {"num_classes": args.num_classes or data.num_classes,
                     "classes": classes_for(data, args.num_classes)}
        if args.image_size is None:
            overrides["image_size"] = tuple(data.image_size)
    loaded = load_source(args, device, **overrides)
    if loaded.task != "classify":
        raise ConfigError(f"{loaded.label} is a {loaded.task} model: `convforge robust` evaluates classifiers")
    if data is None:
        spec = args.data or loaded.data_spec
        if not spec:
            raise ConfigError("the checkpoint names no data; pass --data SPEC")
        data = load_eval_data(loaded, spec, args.image_size)
    return loaded, data


def run_robust(args: argparse.Namespace) -> dict[str, Any]:
    """``convforge robust``: clean and robust accuracy per attack and eps on a seeded subset of a split."""
    from convforge.measure.attacks import parse_eps
    from convforge.robust import evaluate_robustness

    attack_text = args.attack if args.attack is not None else ("" if args.corruptions else "pgd")
    attacks = [a.strip() for a in attack_text.split(",") if a.strip()]
    eps = [e.strip() for e in args.eps.split(",") if e.strip()]
    try:
        step_size = parse_eps(args.step_size) if args.step_size else None
    except ValueError as exc:
        raise ConfigError(f"--step-size: {exc}") from None
    from convforge.robust.evaluation import eps_values, plan_attacks

    plans = plan_attacks(attacks, args.norm, args.steps, step_size, args.restarts, allow_none=bool(args.corruptions))
    if plans:
        eps_values(eps, plans)  # errors before loading
    device = runtime_device(args)
    loaded, data = _load(args, device)
    baseline = None
    if args.baseline:
        from convforge.train.inference import load_model

        baseline = load_model(args.baseline, device=device)
    result = evaluate_robustness(loaded, data, split=args.split, attacks=attacks, eps=eps, norm=args.norm,
                                 samples=args.samples, seed=args.seed, steps=args.steps, step_size=step_size,
                                 restarts=args.restarts, batch_size=args.batch_size, device=device,
                                 out_dir=args.out, corruptions=args.corruptions, severities=args.severities,
                                 baseline=baseline, corruption_params=args.corruption_params)
    if not args.json:
        print_robust(result)
    return result


def print_robust(result: dict[str, Any]) -> None:
    """The table: attack, eps, robust accuracy, points and time (AutoAttack's stages indented below it)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    for note in result.get("notes", []):
        console.print(f"note: {note}", markup=False)
    clean = result["clean"]
    table = Table(title=f"{result['model']} on {result['samples']} {result['split']} images of {result['data']} "
                        f"(seed {result['seed']})")
    for name, justify in (("attack", "left"), ("eps", "right"), ("robust accuracy", "right"), ("points", "right"),
                          ("time", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_row("clean", "0", f"{clean['accuracy']:.2f}%", str(clean["points"]),
                  f"{result['timings']['clean']:.1f} s")
    for row in result["results"]:
        name = row["attack"] if row["norm"] == result["norm"] else f"{row['attack']} ({row['norm']})"
        table.add_row(name, row["eps_text"], f"{row['robust_accuracy']:.2f}%", str(row["points"]),
                      f"{row['seconds']:.1f} s")
        for stage in row.get("stages", []):
            table.add_row(f"  after {stage['stage']}", row["eps_text"], f"{stage['robust_accuracy']:.2f}%",
                          str(row["points"]), "")
    console.print(table)
    if result.get("corruption"):
        print_corruptions(console, result["corruption"])
    for key, path in (result.get("files") or {}).items():
        console.print(f"{key}: {path}", markup=False)


def print_corruptions(console: Any, section: dict[str, Any]) -> None:
    """Accuracy per corruption and severity, the mean per corruption, CE (with a baseline) and the summary line."""
    from rich.table import Table

    levels = section["severities"]
    accuracy = {(r["corruption"], r["severity"]): r["accuracy"] for r in section["rows"]}
    table = Table(title=f"accuracy under corruption (%), severities {', '.join(map(str, levels))}")
    table.add_column("corruption")
    for level in levels:
        table.add_column(str(level), justify="right")
    table.add_column("mean", justify="right")
    with_ce = "mce" in section
    if with_ce:
        table.add_column("CE", justify="right")
        table.add_column("rel. CE", justify="right")
    for record in section["per_corruption"]:
        name = record["corruption"]
        cells = [f"{accuracy[name, level]:.1f}" for level in levels] + [f"{record['accuracy']:.1f}"]
        if with_ce:
            cells += ["-" if record[k] is None else f"{record[k]:.1f}%" for k in ("ce", "relative_ce")]
        table.add_row(name, *cells)
    console.print(table)
    line = f"mean corruption accuracy {section['mean_accuracy']:.2f}%"
    if with_ce:
        shown = ["-" if section[k] is None else f"{section[k]:.1f}%" for k in ("mce", "relative_mce")]
        line += f"; against {section['baseline']}: mCE {shown[0]}, relative mCE {shown[1]}"
    console.print(line, markup=False)


COMMANDS = [
    Command("robust", "robust accuracy under FGSM, PGD and AutoAttack", _add_arguments, run_robust,
            "Attack a classifier (CKPT, a registry model or --model NAME --weights FILE) on a seeded subset of a "
            "split: clean accuracy and robust accuracy per attack (fgsm, pgd, pgd-l2, autoattack: the standard "
            "AutoAttack of RobustBench) and eps, on the same images. With --out the work is recorded per chunk "
            "of --batch-size images, so an interrupted run resumes where it stopped. --corruptions adds accuracy under "
            "the 15 common corruptions (and, with --baseline CKPT, CE and mCE). AutoAttack needs "
            "`pip install --no-deps torchattacks==3.5.1`."),
]
