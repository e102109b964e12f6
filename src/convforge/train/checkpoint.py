"""Checkpoints that describe themselves: safetensors weights plus a JSON sidecar, written atomically.

``NAME.safetensors`` holds the weights and, in its header, the same JSON as ``NAME.json`` (so the
weights file alone is enough); ``resume.safetensors`` holds everything needed to continue a run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from convforge.errors import CheckpointError, ConvforgeError
from convforge.fileio import atomic_write_bytes, atomic_write_json

FORMAT = "convforge-checkpoint"
FORMAT_VERSION = 1
META_KEY = "convforge"
# Tasks whose model outputs are not classes (e.g. super-resolution: image channels), so their checkpoints
# name no classes; register_task (convforge.train.tasks) keeps this up to date.
CLASSLESS_TASKS: set[str] = set()


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``path`` (.safetensors, metadata in its header) and its ``.json`` sidecar, each atomically."""
    from convforge.version import __version__

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
    """The JSON metadata stored in a checkpoint's header, checked by ``validate_meta``."""
    path = resolve_checkpoint_path(path)
    shown = _printable(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(
            f"{shown} is not a readable safetensors file ({_printable(str(exc))[:300]}): it is truncated or "
            f"corrupt; use another checkpoint (e.g. last.safetensors or best.safetensors of the run)"
        ) from None
    if META_KEY not in header:
        raise CheckpointError(f"{shown} has no convforge metadata; load it with --model NAME --weights {shown}")
    try:
        meta = json.loads(header[META_KEY])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; deep nesting a RecursionError
        raise CheckpointError(
            f"{shown}: its convforge metadata is not valid JSON ({type(exc).__name__}: {_printable(str(exc))[:200]}): "
            f"the header is corrupt; use another checkpoint"
        ) from None
    validate_meta(meta, shown)
    return meta


def _printable(text: str | Path) -> str:
    from convforge.data.paths import printable

    return printable(text)


# The largest input height or width a checkpoint may declare (predict resizes images to it).
MAX_INPUT_SIDE = 8192


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_meta(meta: Any, source: str) -> None:
    """Check the fields a checkpoint (or its JSON sidecar) must have; each error names the field.

    Anything else (e.g. a value of the wrong type, a NaN) is a CheckpointError too, never a
    TypeError later: the metadata of a damaged or hand-edited file is untrusted.
    """
    damaged = "the metadata is damaged or hand-edited; use another checkpoint"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not a convforge checkpoint (missing 'format': '{FORMAT}')")
    version = meta.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: checkpoint format version {_short(version)} is not supported (this convforge reads "
            f"version {FORMAT_VERSION}); load it with the convforge version that wrote it"
        )
    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not model["name"]:
        raise CheckpointError(f"{source}: 'model.name' is missing: {damaged}")
    for key in ("num_classes", "in_chans"):
        if not _is_int(model.get(key)) or model[key] < 1:
            raise CheckpointError(f"{source}: 'model.{key}' must be an int >= 1, got {_short(model.get(key))}: {damaged}")
    if not isinstance(model.get("args"), dict) or not all(isinstance(k, str) for k in model["args"]):
        raise CheckpointError(f"{source}: 'model.args' must be dict of named arguments, got {_short(model.get('args'))}")
    classes = meta.get("classes")
    named = meta.get("task", "classify") not in CLASSLESS_TASKS
    if (not isinstance(classes, list) or (named and len(classes) != model["num_classes"])
            or not all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{source}: 'classes' must list {model['num_classes']} class names: {damaged}")
    channels = model["in_chans"]
    norm = meta.get("normalization")
    if (not isinstance(norm, dict) or not all(isinstance(norm.get(k), list) for k in ("mean", "std"))
            or len(norm["mean"]) != channels or len(norm["std"]) != channels
            or not all(_is_number(v) for v in norm["mean"] + norm["std"])
            or not all(v > 0 for v in norm["std"])):
        raise CheckpointError(
            f"{source}: 'normalization' must give finite mean and std (> 0) for {channels} channels: {damaged}"
        )
    size = meta.get("input_size")
    if (not isinstance(size, list) or len(size) != 3 or not all(_is_int(v) and v > 0 for v in size)
            or size[0] != channels or max(size[1:]) > MAX_INPUT_SIDE):
        raise CheckpointError(
            f"{source}: 'input_size' must be [channels, height, width] with channels = model.in_chans = {channels} "
            f"and sides up to {MAX_INPUT_SIDE}, got {_short(size)}: {damaged}"
        )
    data = meta.get("data")
    if "data" in meta and (not isinstance(data, dict) or not isinstance(data.get("spec", ""), str)):
        raise CheckpointError(f"{source}: 'data' must be a mapping with a string 'spec', got {_short(data)}: {damaged}")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode) and what it says about itself (``path`` is None only for
    :class:`convforge.train.inference.LoadedModel`'s registry models, which have no file)."""

    model: nn.Module
    meta: dict[str, Any]
    path: Path | None

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
    shown = _printable(path)
    try:
        model = create_model(spec["name"], num_classes=spec["num_classes"], in_chans=spec["in_chans"], **spec["args"])
        if "pruned" in meta:  # structurally pruned: resize the layers to the widths recorded by convforge.compress
            from convforge.models.widths import apply_widths

            apply_widths(model, meta["pruned"], shown)
        if "quantization" in meta:  # trained quantized (--qat / --binary): the same layer swap as in training
            from convforge.train.qat import prepare_from_record

            model = prepare_from_record(model, meta["quantization"], shown)
    except Exception as exc:  # noqa: BLE001 - a model builder given damaged arguments can fail in any way
        reason = str(exc) if isinstance(exc, ConvforgeError) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(
            f"{shown}: cannot build its model {spec['name']!r} with args {_short(spec['args'])}: {_printable(reason)}. "
            f"The checkpoint was written by another convforge version or its metadata is damaged"
        ) from None
    try:
        state = st_load(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{shown} is not a readable safetensors file ({_printable(str(exc))[:300]})") from None
    load_state_dict_checked(model, state, shown)
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
