"""Tasks: prompt templates, local loaders and metrics. See :mod:`mobizo.tasks.base`."""

from .base import KINDS, TASKS, Example, Task, get_task, register

__all__ = ["KINDS", "TASKS", "Example", "Task", "get_task", "register"]
