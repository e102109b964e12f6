"""The Python entry points that combine the layers: ``fit`` trains with the standard callbacks attached."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from convforge.config import TrainConfig
from convforge.train.callbacks import Callback


def standard_callbacks() -> list[Callback]:
    """The callbacks behind the config flags ``filter_health``, ``tensorboard`` and ``report``.

    Each one acts only when the run's resolved config (after --resume and --recipe) sets its flag,
    and only on the main process.
    """
    from convforge.inspect.callbacks import FilterHealthCallback
    from convforge.report.callbacks import ReportCallback, TensorboardCallback

    return [FilterHealthCallback(), TensorboardCallback(), ReportCallback()]


def fit(config: TrainConfig | None = None, *, callbacks: Sequence[Callback] = (),
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None, role: Any = None,
        quiet: bool = False) -> dict[str, Any]:
    """Train as ``config`` says (what ``convforge train`` runs) and return the run's summary.

    ``callbacks`` (:class:`convforge.train.callbacks.Callback`) run after the standard ones;
    ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint is written.
    """
    from convforge.train.engine import train

    return train(config, callbacks=[*standard_callbacks(), *callbacks], on_epoch_end=on_epoch_end,
                 role=role, quiet=quiet)
