"""Extraction: the answer is a JSON object of fields; field-F1 (micro over field/value pairs) is the primary."""

from __future__ import annotations

import json
import math
from typing import Any

from pipeline.measure.kinds.base import Scored, TaskKind
from pipeline.measure.kinds.fields import f1, field_counts, first_json_object, same_object


class Extraction(TaskKind):
    name = "extraction"
    primary = "field_f1"
    primary_label = "field-F1"
    binary = False
    secondary = ("exact_match", "exact match")
    row_mean = False  # micro over pairs: a row with more fields weighs more
    item_table = "per_field.json"

    @classmethod
    def default_max_new_tokens(cls, target_tokens: list[int]) -> int:
        """The longest train target and a quarter more: an object cut short is no JSON at all."""
        return math.ceil(1.25 * max(target_tokens)) + 1

    @classmethod
    def from_task(cls, task: Any, parser: str) -> "Extraction":
        return cls(task.schema or {})

    def __init__(self, schema: dict[str, Any]):
        self.schema = schema
        self.fields = list(schema.get("properties", {}))

    def score(self, output: str, target: str) -> Scored:
        parsed, gold = first_json_object(output), json.loads(target)
        per_field = field_counts(parsed, gold, self.fields)
        tp, fp, fn = (sum(c[i] for c in per_field.values()) for i in range(3))
        return Scored(parsed, f1(tp, fp, fn)[2], same_object(parsed, gold, self.fields), (tp, fp, fn), per_field)

    def metrics(self, scored: list[Scored], targets: list[str], outputs: list[str]) -> dict[str, float]:
        """field_f1, field_precision, field_recall (micro over the rows' field/value pairs), exact_match (every
        field right), json_valid_rate (an object was found) and invalid_rate (none was)."""
        tp, fp, fn = (sum(s.counts[i] for s in scored) for i in range(3))
        precision, recall, f = f1(tp, fp, fn)
        valid = sum(s.parsed is not None for s in scored) / len(scored)
        return {"field_f1": f, "field_precision": precision, "field_recall": recall,
                "exact_match": sum(s.exact for s in scored) / len(scored), "json_valid_rate": valid,
                "invalid_rate": 1.0 - valid}

    def prediction_fields(self, scored: Scored) -> dict[str, Any]:
        tp, fp, fn = scored.counts
        return {"parsed": scored.parsed, "correct": scored.exact, "score": round(scored.score, 6),
                "tp": tp, "fp": fp, "fn": fn, "field_counts": scored.per_field}

    def per_item_table(self, answers: list[dict]) -> list[dict]:
        """Precision, recall, F1 and support (pairs in the targets) of each field: `per_field.json`, summed from
        each row's `field_counts` as evaluated."""
        totals: dict[str, list[int]] = {name: [0, 0, 0] for name in self.fields}
        for answer in answers:
            for name, counts in answer["field_counts"].items():
                totals[name] = [a + b for a, b in zip(totals.get(name, [0, 0, 0]), counts)]
        rows = []
        for name, (tp, fp, fn) in totals.items():
            p, r, f = f1(tp, fp, fn)
            rows.append({"field": name, "precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4),
                         "support": tp + fn, "predicted": tp + fp})
        return rows
