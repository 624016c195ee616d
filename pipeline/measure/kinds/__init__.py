"""Task types: what a row's target is, how an answer is read and scored, and the one primary metric the
compare, the intervals, the paired test, the quality-adjusted costs and the verdict use."""

from __future__ import annotations

from pipeline.measure.kinds.base import Scored, TaskKind
from pipeline.measure.kinds.classification import Classification
from pipeline.measure.kinds.extraction import Extraction
from pipeline.measure.kinds.generation import Generation
from pipeline.task.types import TaskData

KINDS: dict[str, type[TaskKind]] = {k.name: k for k in (Classification, Extraction, Generation)}


def task_kind(task: TaskData, parser: str = "search") -> TaskKind:
    """The task's type, ready to score answers (a classification's with the arm's `eval.parser`)."""
    return KINDS[task.type].from_task(task, parser)

__all__ = ["KINDS", "task_kind", "Scored", "TaskKind", "Classification", "Extraction", "Generation"]
