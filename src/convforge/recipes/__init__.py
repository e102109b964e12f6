"""Named training recipes shipped with convforge as YAML (``--recipe NAME``, ``convforge recipes``).

Each file holds ``description``, ``source`` (where the recipe comes from), optional ``notes``
and ``options`` (TrainConfig keys). Options given on the command line or in a config file win
over the recipe; in Python, ``recipe_config(name, **overrides)`` does the same. A bare
``TrainConfig(recipe=NAME)`` takes the recipe's value for every option left at its default.
"""

from __future__ import annotations

import dataclasses
import difflib
from importlib import resources
from typing import Any

import yaml

from convforge.config import TrainConfig, coerce_fields
from convforge.errors import ConfigError


def _files() -> dict[str, Any]:
    return {f.name[:-5]: f for f in resources.files(__name__).iterdir() if f.name.endswith(".yaml")}


def list_recipes() -> list[dict[str, Any]]:
    """Every shipped recipe: name, description, source, notes and options."""
    return [recipe(name) for name in sorted(_files())]


def recipe(name: str) -> dict[str, Any]:
    """One recipe by name; an unknown name lists the closest ones."""
    files = _files()
    if name not in files:
        close = difflib.get_close_matches(name, list(files), n=3, cutoff=0.3)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ConfigError(f"unknown recipe {name!r}.{hint} Run `convforge recipes` for the list.")
    document = yaml.safe_load(files[name].read_text(encoding="utf-8"))
    options = coerce_fields(document.get("options") or {}, f"recipe {name}")
    return {"name": name, "description": document["description"], "source": document["source"],
            "notes": document.get("notes", ""), "options": options}


EXPLICIT = "explicit_fields"  # attribute of a TrainConfig: the options the user set, which a recipe must not touch


def recipe_config(name: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig from recipe ``name`` with ``overrides`` on top (they win even when equal to a default)."""
    config = TrainConfig(recipe=name, **overrides)
    setattr(config, EXPLICIT, set(overrides))
    return apply_recipe(config)


def apply_recipe(config: TrainConfig) -> TrainConfig:
    """``config`` with ``config.recipe``'s options filled in, except where the user set the option.

    What the user set is ``config.explicit_fields`` when present (the CLI and ``recipe_config``
    record it); otherwise every option still at its default value takes the recipe's value.
    """
    if not config.recipe:
        return config
    options = recipe(config.recipe)["options"]
    explicit = getattr(config, EXPLICIT, None)
    defaults = TrainConfig()
    changes = {k: v for k, v in options.items()
               if (k not in explicit if explicit is not None else getattr(config, k) == getattr(defaults, k))}
    merged = dataclasses.replace(config, **changes)
    setattr(merged, EXPLICIT, {f.name for f in dataclasses.fields(TrainConfig)})  # applied: never again
    return merged
