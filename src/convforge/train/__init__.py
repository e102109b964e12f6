"""The training engine, checkpoints and evaluation."""

from convforge.train.checkpoint import Checkpoint, load_checkpoint, read_checkpoint_meta, save_checkpoint
from convforge.train.engine import TrainingInterrupted, train
from convforge.train.evaluate import evaluate

__all__ = ["Checkpoint", "TrainingInterrupted", "evaluate", "load_checkpoint", "read_checkpoint_meta",
           "save_checkpoint", "train"]
