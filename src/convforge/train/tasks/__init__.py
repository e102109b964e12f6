"""Tasks: what the engine needs to know about classification, segmentation, super-resolution or a new task.

One engine trains every task (``--task classify|segment|super-resolve``); a task says only what
differs (see :class:`Task`). A new task subclasses :class:`Task` and calls :func:`register_task`.
"""

from convforge.train.tasks.base import CLASSIFY_ONLY, Step, Task, get_task, register_task, task_names, unregister_task
from convforge.train.tasks.classify import ClassifyTask
from convforge.train.tasks.segment import SegmentTask
from convforge.train.tasks.super_resolve import SUPERRES_KINDS, SuperResolveTask

for _task in (ClassifyTask(), SegmentTask(), SuperResolveTask()):
    register_task(_task)

TASKS = tuple(task_names())  # the built-in tasks

__all__ = ["CLASSIFY_ONLY", "ClassifyTask", "SUPERRES_KINDS", "SegmentTask", "Step", "SuperResolveTask", "TASKS",
           "Task", "get_task", "register_task", "task_names", "unregister_task"]
