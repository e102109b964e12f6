"""The model registry: ``@register_model`` adds a builder with its metadata; ``create_model`` builds by name."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from convforge.errors import ConfigError
from convforge.models.pretrained import PretrainedCfg, pretrained_cfg as _table_cfg


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model before building it."""

    name: str
    family: str
    builder: Callable[..., nn.Module]
    paper: str = ""
    year: int | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
    num_classes: int = 1000
    published_params: int | None = None
    published_macs: int | None = None
    published_top1: float | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: PretrainedCfg | None = None  # the preprocessing its published ImageNet weights expect

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``convforge models --json``)."""
        return {
            "name": self.name,
            "family": self.family,
            "paper": self.paper,
            "year": self.year,
            "input_size": list(self.input_size),
            "num_classes": self.num_classes,
            "published_params": self.published_params,
            "published_macs": self.published_macs,
            "published_top1": self.published_top1,
            "description": self.description,
            "pretrained_cfg": self.pretrained_cfg.as_dict() if self.pretrained_cfg else None,
        }


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str | None = None,
    *,
    family: str,
    paper: str = "",
    year: int | None = None,
    input_size: tuple[int, int, int] = (3, 224, 224),
    num_classes: int = 1000,
    published_params: int | None = None,
    published_macs: int | None = None,
    published_top1: float | None = None,
    description: str = "",
    pretrained_cfg: PretrainedCfg | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder ``fn(num_classes=..., in_chans=..., **kwargs) -> nn.Module``.

    ``pretrained_cfg``: the preprocessing its published weights expect (default: the entry of
    ``convforge.models.pretrained`` for this name, if any).
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is registered twice")
        _REGISTRY[key] = ModelInfo(
            name=key,
            family=family,
            builder=builder,
            paper=paper,
            year=year,
            input_size=input_size,
            num_classes=num_classes,
            published_params=published_params,
            published_macs=published_macs,
            published_top1=published_top1,
            description=description or (builder.__doc__ or "").strip().splitlines()[0],
            pretrained_cfg=pretrained_cfg or _table_cfg(key),
        )
        return builder

    return decorate


def unregister_model(name: str) -> None:
    """Remove a registered model (a plugin's or a test's); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` is a shell-style wildcard (``resnet*``) or a substring."""
    names = sorted(_REGISTRY)
    if not pattern:
        return names
    if any(ch in pattern for ch in "*?["):
        return [n for n in names if fnmatch.fnmatch(n, pattern)]
    return [n for n in names if pattern in n]


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; an unknown name raises an error listing the closest names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.4)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise ConfigError(
            f"unknown model {name!r}.{hint} Run `convforge models` for the full list."
        ) from None


def create_model(name: str, num_classes: int | None = None, in_chans: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model("resnet20", num_classes=10)``."""
    info = model_info(name)
    if num_classes is None:
        num_classes = info.num_classes
    if in_chans is None:
        in_chans = info.input_size[0]
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if in_chans < 1:
        raise ConfigError(f"in_chans must be >= 1, got {in_chans}")
    try:
        model = info.builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for model {name!r}: {exc}") from None
    model.convforge_name = name  # type: ignore[attr-defined]
    return model
