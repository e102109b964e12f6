"""Training callbacks of the inspect layer: filter health after every epoch (``--filter-health``)."""

from __future__ import annotations

from typing import Any

from convforge.inspect import filter_health
from convforge.train.callbacks import Callback


class FilterHealthCallback(Callback):
    """Adds ``filter_health`` (summary and per-layer flags) to each epoch's record and warns about new flags.

    Acts when the run's config sets ``filter_health`` (or ``always``). The check at the start is the baseline: only flags that appear later are warned about. Runs on
    the main process only.
    """

    def __init__(self, always: bool = False) -> None:
        self.always = always  # False: only when the run's config sets filter_health
        self.active = False
        self.health: dict[str, Any] | None = None

    def on_start(self, state: Any) -> None:
        self.active = state.is_main and (self.always or state.cfg.filter_health)
        if self.active:
            self.health = filter_health(state.model)

    def on_epoch_end(self, state: Any, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.health = filter_health(state.model, previous=self.health)
        record["filter_health"] = {"summary": self.health["summary"], "layers": self.health["layers"]}
        for warning in self.health["warnings"]:
            state.run.log(f"filter health: {warning}")
            state.say(f"warning: filter health: {warning}")
