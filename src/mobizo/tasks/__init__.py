"""Tasks: prompt templates, local loaders and metrics. See :mod:`mobizo.tasks.base`.

Importing this package registers every built-in task (:func:`mobizo.tasks.base.register`).
"""

from ..errors import MobizoError
from . import benchmarks, custom, synthetic  # noqa: F401 - registration
from .base import KINDS, TASKS, Example, Task, canonical_name, register

__all__ = ["KINDS", "TASKS", "Example", "Task", "get_task", "register", "task_class"]


def task_class(name: str, label_words=None, data=None) -> type[Task]:
    """The class of task ``name``; ``custom`` is classification with ``label_words``, multiple choice when its
    training records carry their own ``choices`` (read from ``data``), prompt/completion otherwise."""
    key = canonical_name(name)
    if key == "custom" and label_words:
        key = "custom-cls"  # --task custom --template ... --label-words ...: classification
    elif key == "custom":
        from .custom import is_multiple_choice

        if is_multiple_choice(data):
            key = "custom-mc"  # records with their own "choices": multiple choice
    if key not in TASKS:
        raise MobizoError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    return TASKS[key]


def get_task(name: str, data: str | None = None, inputs_only: bool = False, **options) -> Task:
    """The task ``name``. ``inputs_only``: a task that reads no split (``mobizo predict`` ranks new inputs),
    so one that trains from files does without ``data``."""
    cls = task_class(name, options.get("label_words"), data)
    if inputs_only and cls.needs_data and not data:
        data = "-"  # never read: no split is loaded
    return cls(data=data, **options)
