"""Training callbacks of the report layer: TensorBoard scalars and the end-of-run HTML report."""

from __future__ import annotations

from typing import Any

from convforge.train.callbacks import Callback


class TensorboardCallback(Callback):
    """When the config sets ``tensorboard``: each epoch's numeric metrics as TensorBoard scalars under ``RUN/tensorboard`` (main process only)."""

    def __init__(self, always: bool = False) -> None:
        self.always = always  # False: only when the run's config sets tensorboard
        self.logger: Any = None

    def on_start(self, state: Any) -> None:
        if state.is_main and (self.always or state.cfg.tensorboard):
            from convforge.report.tensorboard import TensorboardLogger

            self.logger = TensorboardLogger(state.run.path)

    def on_epoch_saved(self, state: Any, record: dict[str, Any]) -> None:
        if self.logger is not None:
            self.logger.log_epoch(record["epoch"], record)

    def close(self, state: Any) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None


class ReportCallback(Callback):
    """When the config sets ``report``: writes ``RUN/report.html`` when the run completes (main process only).

    A failure is a warning: the run itself succeeded and ``convforge report RUN`` can redo the report.
    """

    def __init__(self, always: bool = False) -> None:
        self.always = always  # False: only when the run's config sets report

    def on_end(self, state: Any, summary: dict[str, Any]) -> None:
        if not state.is_main or not (self.always or state.cfg.report):
            return
        from convforge.report import write_report

        run = state.run
        try:
            report_path = write_report([run.path], run.file("report.html"))
            summary["report"] = str(report_path)
            state.say(f"report: {report_path}")
        except Exception as exc:  # noqa: BLE001 - the run itself succeeded; the report can be redone
            state.say(f"warning: the report could not be written ({type(exc).__name__}: {exc}); "
                      f"retry with: convforge report {run.path}")
