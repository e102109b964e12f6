"""The training engine (with its callbacks and tasks), checkpoints, and the evaluation and inference API
(:mod:`convforge.train.evaluate` for classification splits, :mod:`convforge.train.inference` for any task)."""

from convforge.config import add_task_check
from convforge.train.callbacks import Callback
from convforge.train.checkpoint import Checkpoint, load_checkpoint, read_checkpoint_meta, save_checkpoint
from convforge.train.engine import TrainingInterrupted, train
from convforge.train.qat import check_quantization
from convforge.train.state import TrainingState
from convforge.train.tasks.base import check_task_options

add_task_check(check_task_options)  # TrainConfig.validate checks the task and its options through the registry
add_task_check(check_quantization)  # --qat / --binary settings

__all__ = ["Callback", "Checkpoint", "TrainingInterrupted", "TrainingState", "load_checkpoint",
           "read_checkpoint_meta", "save_checkpoint", "train"]
