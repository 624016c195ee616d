"""The interface every task type implements: score an answer against its target, sum the rows up."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Scored:
    """One answer read against its target.

    `parsed` is what the parser read (a label name, a JSON object, a text) or None where the answer is invalid;
    `score` is the row's value of the primary metric's per-row measure (1/0 correct, the row's chrF, the row's
    field F1); `counts` are the row's (true positive, false positive, false negative) field/value pairs, for a
    primary that is micro-averaged over them rather than a mean over rows.
    """

    parsed: Any
    score: float
    exact: bool
    counts: tuple[int, int, int] | None = None
    per_field: dict[str, list[int]] | None = None  # extraction: `counts` field by field


class TaskKind(ABC):
    """A task type: its primary metric, how answers are read and scored and summed up."""

    name: ClassVar[str]
    primary: ClassVar[str]  # the metric the compare and the verdict read
    primary_label: ClassVar[str]  # how a report names it
    binary: ClassVar[bool]  # every row scores 0 or 1 (McNemar's test applies)
    row_mean: ClassVar[bool]  # the primary is the mean of the rows' scores (a confidence sequence applies)
    secondary: ClassVar[tuple[str, str]]  # the metric a report shows beside the primary, and its label
    answer_tokens_fixed: ClassVar[int | None] = None  # eval.max_new_tokens's default, where not from the data
    item_table: ClassVar[str | None] = None  # the artifact of per-field (or per-item) scores, where the type has one

    @classmethod
    def default_max_new_tokens(cls, target_tokens: list[int]) -> int:
        """eval.max_new_tokens's default from the train targets' token lengths: their 95th percentile and a
        quarter more (an answer may say the same a little longer), plus one for the stop token."""
        ordered = sorted(target_tokens)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return math.ceil(1.25 * p95) + 1

    @classmethod
    def from_task(cls, task: Any, parser: str) -> "TaskKind":
        """The kind for a loaded task (`TaskData`), reading answers with `parser` where the type has a choice."""
        return cls()

    @abstractmethod
    def score(self, output: str, target: str) -> Scored:
        """The answer `output` read and scored against the row's `target` (as the split holds it)."""

    @abstractmethod
    def metrics(self, scored: list[Scored], targets: list[str], outputs: list[str]) -> dict[str, float]:
        """The quality metrics of the scored rows (the primary among them); `outputs` are the raw answers."""

    def prediction_fields(self, scored: Scored) -> dict[str, Any]:
        """What a `predictions.jsonl` row records of the answer beside the raw output."""
        return {"parsed": scored.parsed, "correct": scored.exact, "score": round(scored.score, 6)}

    def per_item_table(self, answers: list[dict]) -> list[dict]:
        """The rows of `item_table` from the arm's `predictions.jsonl` rows: its scores per field (only types with
        an `item_table` have one)."""
        raise NotImplementedError(f"{self.name} has no per-item table")
