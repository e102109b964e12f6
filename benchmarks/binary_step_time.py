"""Training-step time of binary ResNet-20 variants against the fp32 network, on this machine.

One AdamW training step (forward, backward, update) at batch --batch of random 32x32 inputs, channels_last,
for: fp32; binary weights; binary weights+activations (Hardtanh); with Bi-Real shortcuts; with Bi-Real
shortcuts and ReActNet's activations (--binary-react). Each variant's median step time over --rounds
interleaved rounds of --steps steps, after warm-up, as a ratio to fp32.

``--with-where-sign`` adds the Bi-Real variant with the sign and its straight-through gradient written as
``torch.where`` / a float mask (convforge's implementation before 2026-12-01), to measure what the fused
kernels gained, in the same run. ``--with-bf16-compile`` adds fp32 and Bi-Real + ReAct under bfloat16 autocast,
eager and ``torch.compile``d (train's ``--amp`` and ``--compile``): a binary network is mostly elementwise work
(signs, thresholds, PReLUs, shortcut sums) that the compiler fuses; compiling takes a minute or two per network
before the timed rounds.

    python benchmarks/binary_step_time.py [--threads 2] [--batch 128] [--rounds 7] [--with-where-sign]
        [--with-bf16-compile] [--no-record]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

REACT = "binary weights+activations, Bi-Real + ReAct"
VARIANTS = {  # name -> prepare_binary arguments (None: the fp32 network)
    "fp32": None,
    "binary weights": {"mode": "weights"},
    "binary weights+activations (Hardtanh)": {"mode": "weights+activations"},
    "binary weights+activations, Bi-Real": {"mode": "weights+activations", "shortcuts": True},
    REACT: {"mode": "weights+activations", "shortcuts": True, "react": True},
}
WHERE_SIGN = "binary weights+activations, Bi-Real (torch.where sign, float-mask gradient)"
BF16_COMPILE = {  # name -> (VARIANTS key, torch.compile)
    "fp32, bf16 autocast": ("fp32", False),
    "fp32, bf16 autocast + torch.compile": ("fp32", True),
    f"{REACT}, bf16 autocast": (REACT, False),
    f"{REACT}, bf16 autocast + torch.compile": (REACT, True),
}


@contextlib.contextmanager
def where_sign() -> Iterator[None]:
    """convforge's earlier sign and clipped straight-through gradient, patched in for the duration."""
    from convforge.layers import binary

    saved = binary._sign, binary.ClippedSign.backward
    binary._sign = lambda x: torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)

    binary.ClippedSign.backward = staticmethod(backward)
    try:
        yield
    finally:
        binary._sign, binary.ClippedSign.backward = saved[0], staticmethod(saved[1])


def _stepper(options: dict[str, Any] | None, batch: int, model_name: str, bf16: bool = False,
             compiled: bool = False) -> Callable[[], None]:
    from convforge.models import create_model
    from convforge.train.binary import prepare_binary

    torch.manual_seed(0)
    model = create_model(model_name)
    if options is not None:
        model = prepare_binary(model, **options)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compiled else model
    inputs = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(inputs), labels)
        loss.backward()
        optimizer.step()

    return step


def measure(args: argparse.Namespace) -> dict[str, float]:
    """The median seconds per training step of each variant."""
    torch.set_num_threads(args.threads)
    steppers = {name: _stepper(options, args.batch, args.model) for name, options in VARIANTS.items()}
    if args.with_where_sign:
        steppers[WHERE_SIGN] = _stepper(VARIANTS["binary weights+activations, Bi-Real"], args.batch, args.model)
    if args.with_bf16_compile:
        for name, (variant, compiled) in BF16_COMPILE.items():
            steppers[name] = _stepper(VARIANTS[variant], args.batch, args.model, bf16=True, compiled=compiled)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for round_index in range(args.rounds + 1):  # round 0: warm-up
        for name, step in steppers.items():
            with where_sign() if name == WHERE_SIGN else contextlib.nullcontext():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                if round_index:
                    times[name].append((time.perf_counter() - start) / args.steps)
    return {name: statistics.median(values) for name, values in times.items()}


def lines(result: dict[str, float], args: argparse.Namespace) -> list[str]:
    base = result["fp32"]
    out = [f"{args.model}, one AdamW training step at batch {args.batch} (random 32x32 inputs, channels_last), "
           f"threads={args.threads}; median of {args.rounds} interleaved rounds of {args.steps} steps.", "",
           "| network | s/step | images/s | vs fp32 |", "|---|---:|---:|---:|"]
    out += [f"| {name} | {value:.3f} | {args.batch / value:.0f} | {value / base:.2f}x |"
            for name, value in result.items()]
    if WHERE_SIGN in result:
        gain = result[WHERE_SIGN] / result["binary weights+activations, Bi-Real"]
        out += ["", f"The fused sign (sign(sign(x) + 0.5)) and hardtanh_backward gradient make the Bi-Real step "
                    f"{gain:.2f}x as fast as the torch.where sign with a float-mask gradient."]
    if f"{REACT}, bf16 autocast + torch.compile" in result:
        react_gain = result[f"{REACT}, bf16 autocast"] / result[f"{REACT}, bf16 autocast + torch.compile"]
        fp32_gain = result["fp32, bf16 autocast"] / result["fp32, bf16 autocast + torch.compile"]
        out += ["", f"Under bf16 autocast, torch.compile makes the Bi-Real + ReAct step {react_gain:.2f}x as fast "
                    f"(the fp32 network's: {fp32_gain:.2f}x); the compilation itself is not in these figures."]
    out += ["", "Command: `python benchmarks/binary_step_time.py " + " ".join(args.argv) + "`"]
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--with-where-sign", action="store_true")
    parser.add_argument("--with-bf16-compile", action="store_true",
                        help="add fp32 and Bi-Real + ReAct under bf16 autocast, eager and torch.compiled")
    parser.add_argument("--smoke", action="store_true", help="batch 4, 1 round of 1 step; nothing recorded")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.smoke:
        args.batch, args.steps, args.rounds, args.no_record = 4, 1, 1, True
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    result = measure(args)
    record("Binary ResNet-20 training-step time", lines(result, args), save=not args.no_record)
    return result


if __name__ == "__main__":
    main()
