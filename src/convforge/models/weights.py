"""Loading weight files that convforge did not write (``.pth``, ``.th``, ``.pt``, ``.safetensors``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn as nn

from convforge.errors import CheckpointError

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from a safetensors file or a PyTorch pickle, never running code from the file.

    Pickles are opened with ``torch.load(..., weights_only=True)``, which refuses anything but
    tensors and plain containers. A ``{"state_dict": ...}`` wrapper is unwrapped and a
    ``module.`` prefix (from DataParallel) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"refused to load {path}: it contains objects other than tensors and plain containers, "
                f"and unpickling them could run code. convforge only loads such files with "
                f"weights_only=True. Details: {str(exc).splitlines()[0]}"
            ) from None
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable PyTorch weight file: {exc}") from None
    for _ in range(3):
        if isinstance(state, dict) and not _looks_like_state_dict(state):
            nested = next((state[k] for k in _NESTED_KEYS if isinstance(state.get(k), dict)), None)
            if nested is None:
                break
            state = nested
    if not isinstance(state, dict) or not _looks_like_state_dict(state):
        raise CheckpointError(f"{path} holds no state_dict (a mapping of parameter names to tensors)")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return strip_prefix(tensors, "module.")


def _looks_like_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and any(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` with an error that names missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    # BatchNorm's step counter is absent from files saved by older PyTorch versions; it is not a weight.
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(
            f"weights in {source} do not fit {type(model).__name__}: " + "; ".join(parts)
            + ". Check --model and --num-classes against the file."
        )
    model.load_state_dict(state, strict=True)


def load_foreign_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a foreign weight file into ``model`` (strict; errors name the keys that differ)."""
    load_state_dict_checked(model, read_state_dict(path), str(path))
    return model
