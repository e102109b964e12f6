"""The training engine, checkpoints and evaluation."""

from convforge.config import add_task_check
from convforge.train.checkpoint import Checkpoint, load_checkpoint, read_checkpoint_meta, save_checkpoint
from convforge.train.engine import TrainingInterrupted, train
from convforge.train.evaluate import evaluate
from convforge.train.tasks.base import check_task_options

add_task_check(check_task_options)  # TrainConfig.validate checks the task and its options through the registry

__all__ = ["Checkpoint", "TrainingInterrupted", "evaluate", "load_checkpoint", "read_checkpoint_meta",
           "save_checkpoint", "train"]
