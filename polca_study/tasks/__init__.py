"""The registry of tasks: a new task is a module here (or anywhere) and one line below."""

from __future__ import annotations

from polca_study.errors import choice
from polca_study.tasks import arithmetic, text
from polca_study.tasks.task import Task, TaskKind

TASKS: dict[str, TaskKind] = {kind.name: kind for kind in (arithmetic.KIND, text.KIND)}


def make_task(dataset, cache=None) -> Task:
    """The task of a validated dataset config (its TaskKind's schema)."""
    choice("dataset.name", dataset.name, TASKS)
    return TASKS[dataset.name].build(dataset, cache)
