"""Checkpoints that describe themselves: safetensors weights plus a JSON sidecar, written atomically.

``NAME.safetensors`` holds the weights and, in its header, the same JSON as ``NAME.json`` (so the
weights file alone is enough); ``resume.safetensors`` holds everything needed to continue a run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from convforge.errors import CheckpointError
from convforge.fileio import atomic_write_bytes, atomic_write_json

FORMAT = "convforge-checkpoint"
FORMAT_VERSION = 1
META_KEY = "convforge"


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``path`` (.safetensors, metadata in its header) and its ``.json`` sidecar, each atomically."""
    from convforge import __version__

    path = Path(path).with_suffix(".safetensors")
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "convforge_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta}
    blob = st_save(_tensors(model.state_dict()), metadata={META_KEY: json.dumps(full)})
    atomic_write_bytes(path, blob)
    atomic_write_json(path.with_suffix(".json"), full)
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run directory means its best checkpoint; ``X.json`` means ``X.safetensors``."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a directory without best.safetensors or last.safetensors")
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path} is not a convforge checkpoint (.safetensors). For foreign weight files use "
            f"--model NAME --weights {path}"
        )
    return path


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata stored in a checkpoint's header."""
    path = resolve_checkpoint_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    if META_KEY not in header:
        raise CheckpointError(f"{path} has no convforge metadata; load it with --model NAME --weights {path}")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: its convforge metadata is not valid JSON ({exc})") from None
    validate_meta(meta, str(path))
    return meta


def validate_meta(meta: Any, source: str) -> None:
    """Check the fields a checkpoint sidecar must have, with errors naming the field."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not a convforge checkpoint (missing 'format': '{FORMAT}')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{source}: checkpoint format version {meta.get('format_version')!r} is not supported")
    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise CheckpointError(f"{source}: 'model.name' is missing")
    for key, kind in (("num_classes", int), ("in_chans", int), ("args", dict)):
        if not isinstance(model.get(key), kind):
            raise CheckpointError(f"{source}: 'model.{key}' must be {kind.__name__}")
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) != model["num_classes"] or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{source}: 'classes' must list {model['num_classes']} class names")
    norm = meta.get("normalization")
    if (not isinstance(norm, dict) or not all(isinstance(norm.get(k), list) for k in ("mean", "std"))
            or len(norm["mean"]) != model["in_chans"] or len(norm["std"]) != model["in_chans"]
            or not all(isinstance(v, (int, float)) for v in norm["mean"] + norm["std"])
            or not all(v > 0 for v in norm["std"])):
        raise CheckpointError(f"{source}: 'normalization' must give mean and std (> 0) for {model['in_chans']} channels")
    size = meta.get("input_size")
    if not isinstance(size, list) or len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise CheckpointError(f"{source}: 'input_size' must be [channels, height, width]")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode) and what it says about itself."""

    model: nn.Module
    meta: dict[str, Any]
    path: Path

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.meta["normalization"]["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.meta["normalization"]["std"])

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.meta["input_size"])  # type: ignore[return-value]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a convforge checkpoint (file, sidecar or run directory) and rebuild its model."""
    from convforge.models import create_model
    from convforge.models.weights import load_state_dict_checked

    path = resolve_checkpoint_path(path)
    meta = read_checkpoint_meta(path)
    spec = meta["model"]
    model = create_model(spec["name"], num_classes=spec["num_classes"], in_chans=spec["in_chans"], **spec["args"])
    state = st_load(path.read_bytes())
    load_state_dict_checked(model, state, str(path))
    model.to(device).eval()
    return Checkpoint(model=model, meta=meta, path=path)


# ---------------------------------------------------------------- resume state


def save_train_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: nn.Module | None,
    extra: dict[str, Any],
) -> Path:
    """Model, optimizer, EMA and RNG states in one safetensors file (plus JSON ``extra``), atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in opt_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    info = {"extra": extra, "param_groups": opt_state["param_groups"], "optim_scalars": scalars}
    blob = st_save(_tensors(tensors), metadata={META_KEY: json.dumps(info)})
    return atomic_write_bytes(path, blob)


def load_train_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None
) -> dict[str, Any]:
    """Restore what ``save_train_state`` wrote; returns its ``extra`` dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no resume state at {path}: the run did not finish an epoch")
    try:
        with safe_open(str(path), framework="pt") as handle:
            info = json.loads((handle.metadata() or {})[META_KEY])
        tensors = st_load(path.read_bytes())
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable resume state: {exc}") from None

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(part("model."))
    if ema is not None:
        ema.load_state_dict(part("ema."))
    state: dict[int, dict[str, Any]] = {}
    for key, value in part("optim.").items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, values in info["optim_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(len(part("rng.cuda.")))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return info["extra"]
