"""One evaluation for every arm: the same output parser, metrics and latency statistics."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

INVALID = -1
_METRICS_DIR = Path(__file__).parent / "metrics"
_LOOSE = re.compile(r"[\s_]+")
# Wrapping a model may put around an answer: quotes, backticks, markdown bold, a final period.
_WRAPPING = " \t\"'`*.:;,!?()[]{}<>"


def _key(text: str) -> str:
    return _LOOSE.sub("", text.lower())


def parse_label(output: str, labels: list[str]) -> int:
    """Index of the label the output names, or INVALID.

    The answer is the first non-empty line, stripped of wrapping punctuation and matched
    against the label set ignoring case, spaces and underscores. Anything else is invalid.
    """
    lookup = {_key(name): i for i, name in enumerate(labels)}
    for line in output.splitlines():
        if line.strip():
            return lookup.get(_key(line.strip(_WRAPPING)), INVALID)
    return INVALID


@lru_cache(maxsize=None)
def _metric(name: str):
    import evaluate

    # Local metric modules: evaluate.load("accuracy") would fetch a script from the hub.
    return evaluate.load(str(_METRICS_DIR / name))


def score(predictions: list[int], references: list[int], n_labels: int) -> dict[str, float]:
    """accuracy, macro_f1 and invalid_rate; invalid predictions count as wrong."""
    if not references:
        raise ValueError("no rows to score")
    accuracy = _metric("accuracy").compute(predictions=predictions, references=references)["accuracy"]
    macro_f1 = _metric("macro_f1").compute(
        predictions=predictions, references=references, labels=list(range(n_labels))
    )["macro_f1"]
    invalid_rate = sum(p == INVALID for p in predictions) / len(predictions)
    return {"accuracy": accuracy, "macro_f1": macro_f1, "invalid_rate": invalid_rate}


def latency_stats(latencies_ms: list[float]) -> dict[str, float]:
    """p50/p95/p99 and coefficient of variation of per-call latency."""
    values = np.asarray(latencies_ms, dtype=float)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    mean = float(values.mean())
    cv = float(values.std() / mean) if mean > 0 else 0.0
    return {"latency_p50_ms": float(p50), "latency_p95_ms": float(p95), "latency_p99_ms": float(p99),
            "latency_cv": cv}
