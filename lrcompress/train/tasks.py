"""The benchmarks of the paper as tasks: build one from a recipe's ``[task]`` section.

=============  =====================================================  ==========  =========
name           what                                                   output      metric
=============  =====================================================  ==========  =========
``copy``       memory task, lag N (+ variable length / variable lag)  sequence    ce (nats)
``addition``   addition task of length T                              last        mse
``mnist``      (permuted) sequential MNIST, or flat for highway nets  last        accuracy
``ptb_char``   character-level Penn Treebank language modelling       sequence    bpc
``text``       character-level LM on any UTF-8 text (default: CPython  sequence    bpc
               ``pydoc_data.topics``, no download)
=============  =====================================================  ==========  =========

    >>> task = build_task({"name": "addition", "length": 20, "train_size": 1000})
    >>> task.metric, task.output
    ('mse', 'last')
"""

from __future__ import annotations

from ..errors import ConfigError
from .tasks_base import IGNORE, SPLITS, Batch, Task
from .tasks_data import MissingDataError, MnistTask, PtbCharTask, find_data_file, read_idx, read_mnist
from .tasks_synthetic import AdditionTask, CopyTask, SyntheticTask
from .tasks_text import TextTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (CopyTask, AdditionTask, MnistTask, PtbCharTask, TextTask)}

__all__ = ["IGNORE", "SPLITS", "TASKS", "AdditionTask", "Batch", "CopyTask", "MissingDataError", "MnistTask",
           "PtbCharTask", "SyntheticTask", "Task", "TextTask", "build_task", "check_task", "find_data_file", "read_idx",
           "read_mnist", "task_class"]


def task_class(spec: dict) -> type[Task]:
    """The task class named by ``spec["name"]``."""
    name = spec.get("name") if isinstance(spec, dict) else None
    if name not in TASKS:
        raise ConfigError(f"task.name must be one of {', '.join(sorted(TASKS))}, got {name!r}")
    return TASKS[name]


def check_task(spec: dict) -> dict:
    """The task section with its defaults filled in; raises ``ConfigError`` on a bad key or value."""
    return task_class(spec).checked(spec)


def build_task(spec: dict) -> Task:
    """A task from a recipe's ``[task]`` section. Data files are read on first use."""
    return task_class(spec)(spec)
