"""Callbacks: code that runs at fixed points of a training run, without the engine knowing it.

Subclass :class:`Callback` and override what you need; pass instances to
``convforge.fit(config, callbacks=[...])`` (or ``convforge.train.engine.train``). Every method gets
the run's :class:`~convforge.train.state.TrainingState`. Order of calls::

    on_start                      after set-up, before the first epoch
    on_epoch_end(record)          after the epoch's evaluation, before the record is written
                                  (add JSON-able entries to ``record`` to have them in metrics.jsonl)
    on_epoch_saved(record)        after the record, checkpoints and resume state are written
                                  (raising TrainingInterrupted here stops a run that resumes cleanly)
    on_end(summary)               after summary.json is written (add entries to the returned summary)
    close                         always, last, even when the run failed or was interrupted

With several processes (DDP) callbacks run on every rank; check ``state.is_main`` before writing files.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable


class Callback:
    """Base class of training callbacks: every hook does nothing unless overridden."""

    def on_start(self, state: Any) -> None:
        """The run is set up (model, data, run directory, resume state) and about to train."""

    def on_epoch_end(self, state: Any, record: dict[str, Any]) -> None:
        """An epoch has been trained and evaluated; ``record`` is about to be written to metrics.jsonl."""

    def on_epoch_saved(self, state: Any, record: dict[str, Any]) -> None:
        """The epoch's record, checkpoints and resume state are on disk."""

    def on_end(self, state: Any, summary: dict[str, Any]) -> None:
        """The run completed; summary.json is written."""

    def close(self, state: Any) -> None:
        """Release resources; runs last, also after an error or an interrupt."""


class EpochEndHook(Callback):
    """The older ``on_epoch_end(epoch, record)`` function, called after each epoch's checkpoint is written."""

    def __init__(self, function: Callable[[int, dict[str, Any]], None]) -> None:
        self.function = function

    def on_epoch_saved(self, state: Any, record: dict[str, Any]) -> None:
        self.function(record["epoch"], record)


class CallbackList(Callback):
    """Several callbacks called in order; ``close`` reaches every one even if one fails."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"{callback!r} is not a convforge.train.callbacks.Callback: subclass it")

    def on_start(self, state: Any) -> None:
        for callback in self.callbacks:
            callback.on_start(state)

    def on_epoch_end(self, state: Any, record: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(state, record)

    def on_epoch_saved(self, state: Any, record: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_epoch_saved(state, record)

    def on_end(self, state: Any, summary: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_end(state, summary)

    def close(self, state: Any) -> None:
        error: BaseException | None = None
        for callback in self.callbacks:
            try:
                callback.close(state)
            except Exception as exc:  # noqa: BLE001 - the others still close; the first error is raised
                error = error or exc
        if error is not None:
            raise error
