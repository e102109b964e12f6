"""Optional TensorBoard event logging of a run's epoch metrics (``convforge train --tensorboard``).

Uses the SummaryWriter of ``torch.utils.tensorboard``, which needs the ``tensorboard`` package
(``pip install 'convforge[tensorboard]'``). Events go to ``RUN/tensorboard``; view them with
``tensorboard --logdir RUN/tensorboard`` (or a parent folder to compare runs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from convforge.errors import ConfigError

# metrics.jsonl key -> TensorBoard tag; other numeric keys go under "other/KEY".
TAGS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "test_loss": "loss/test",
    "train_top1": "top1/train", "val_top1": "top1/val", "test_top1": "top1/test",
    "val_top5": "top5/val", "test_top5": "top5/test",
    "lr": "lr", "images_per_s": "speed/images_per_s",
    "train_time_s": "time/train_s", "eval_time_s": "time/eval_s", "elapsed_s": "time/elapsed_s",
    "skipped_batches": "health/skipped_batches",
}


class TensorboardLogger:
    """Writes each epoch's numeric metrics as TensorBoard scalars (step = epoch) under ``RUN/tensorboard``."""

    def __init__(self, run_dir: str | Path, subdir: str = "tensorboard") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'convforge[tensorboard]' "
                              "(or pip install tensorboard)") from None
        self.log_dir = Path(run_dir) / subdir
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            self.writer.add_scalar(TAGS.get(key, f"other/{key}"), value, global_step=int(epoch))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorboardLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
