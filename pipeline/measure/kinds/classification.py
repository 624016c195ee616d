"""Single-label classification: the answer names one label of the set; accuracy is the primary metric."""

from __future__ import annotations

from typing import Any

from pipeline.measure.kinds.base import Scored, TaskKind
from pipeline.measure.scoring import INVALID, PARSERS, score


class Classification(TaskKind):
    name = "classification"
    primary = "accuracy"
    primary_label = "accuracy"
    binary = True
    secondary = ("macro_f1", "macro-F1")
    row_mean = True
    answer_tokens_fixed = 32  # room for a sentence: a verbose answer is not cut before it names its label

    @classmethod
    def from_task(cls, task: Any, parser: str) -> "Classification":
        return cls(task.label_names, parser)

    def __init__(self, labels: list[str], parser: str = "search"):
        self.labels, self.parser = list(labels), parser
        self._index = {name: i for i, name in enumerate(self.labels)}

    def score(self, output: str, target: str) -> Scored:
        i = PARSERS[self.parser](output, self.labels)
        right = i != INVALID and self.labels[i] == target
        return Scored(self.labels[i] if i != INVALID else None, float(right), right)

    def metrics(self, scored: list[Scored], targets: list[str], outputs: list[str]) -> dict[str, float]:
        """accuracy, macro-F1 and invalid_rate; `accuracy_exact` and `accuracy_search` score the same answers with
        each parser, so a verbose arm's loss to the strict one shows."""
        predicted = [self._index.get(s.parsed, INVALID) for s in scored]
        gold = [self._index[t] for t in targets]
        out = score(predicted, gold, len(self.labels))
        for name, parse in PARSERS.items():
            out[f"accuracy_{name}"] = sum(parse(o, self.labels) == g for o, g in zip(outputs, gold)) / len(outputs)
        return out

    def prediction_fields(self, scored: Scored) -> dict[str, Any]:
        return {"parsed_label": scored.parsed, "correct": scored.exact}
