"""The Python entry points that combine the layers: ``fit`` trains with the standard callbacks attached."""

from __future__ import annotations

from typing import Any, Sequence

from convforge.config import TrainConfig


def fit(config: TrainConfig | None = None, *, callbacks: Sequence[Any] = (), on_epoch_end: Any = None,
        role: Any = None, quiet: bool = False) -> dict[str, Any]:
    """Train as ``config`` says (what ``convforge train`` runs) and return the run's summary."""
    from convforge.train.engine import train

    return train(config, on_epoch_end=on_epoch_end, role=role, quiet=quiet)
