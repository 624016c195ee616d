"""One evaluation for every arm: the label parsers, the classification metrics and the latency statistics."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.task.types import label_key

INVALID = -1
_METRICS_DIR = Path(__file__).parent / "metrics"
# Wrapping a model may put around an answer: quotes, backticks, markdown bold, a final period.
_WRAPPING = " \t\"'`*.:;,!?()[]{}<>"
_QUOTES = " \t\"'`*"


def read_predictions(path: Path) -> list[dict]:
    """The rows of a `predictions.jsonl`. Split on newlines only: str.splitlines also splits on U+2028 and its
    kin, which JSON leaves unescaped inside strings."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def parse_label(output: str, labels: list[str]) -> int:
    """Index of the label the output names, or INVALID.

    The answer is the first non-empty line, stripped of wrapping punctuation and matched
    against the label set ignoring case, spaces and underscores. Anything else is invalid.
    """
    lookup = {label_key(name): i for i, name in enumerate(labels)}
    for line in output.splitlines():
        if line.strip():
            # Least stripped first: a label may itself end in punctuation ("reverted_card_payment?").
            for candidate in (line, line.strip(_QUOTES), line.strip(_WRAPPING)):
                if label_key(candidate) in lookup:
                    return lookup[label_key(candidate)]
            return INVALID
    return INVALID


@lru_cache(maxsize=64)
def _label_pattern(labels: tuple[str, ...]) -> re.Pattern:
    """Every label as a whole phrase, case-insensitive, with spaces, underscores and hyphens
    interchangeable; longer labels first, so at any position the longest label wins."""
    def phrase(name: str) -> str:
        words = [re.escape(w) for w in re.split(r"[\s_\-]+", name.strip()) if w]
        return r"[\s_\-]*".join(words)

    ordered = sorted(range(len(labels)), key=lambda i: -len(labels[i]))
    alternatives = "|".join(f"(?P<l{i}>{phrase(labels[i])})" for i in ordered)
    return re.compile(rf"(?<![0-9a-z])(?:{alternatives})(?![0-9a-z])", re.IGNORECASE)


def search_label(output: str, labels: list[str]) -> int:
    """Index of the one label the output names anywhere (e.g. "This message is about billing."), or INVALID.

    Matches are whole phrases, longest label first at each position (so `card_arrival` is not read
    as `card`); an output that names no label, or two different ones, is invalid: it did not choose.
    """
    found = {int(m.lastgroup[1:]) for m in _label_pattern(tuple(labels)).finditer(output)}
    return found.pop() if len(found) == 1 else INVALID


PARSERS = {"exact": parse_label, "search": search_label}


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
    # Over the labels present in these rows: a label a sampled test set lacks would score 0 and deflate it.
    macro_f1 = _metric("macro_f1").compute(
        predictions=predictions, references=references, labels=sorted(set(references))
    )["macro_f1"]
    invalid_rate = sum(p == INVALID for p in predictions) / len(predictions)
    return {"accuracy": accuracy, "macro_f1": macro_f1, "invalid_rate": invalid_rate}


def latency_stats(latencies_ms: list[float], pass_p50_ms: list[float] | None = None) -> dict[str, float]:
    """p50/p95/p99 and coefficient of variation of per-call latency.

    `latency_cv` is the spread across calls (what callers see); with two or more timed passes,
    `latency_repeat_cv` is the spread of the passes' p50 (how far to trust the timing).
    """
    values = np.asarray(latencies_ms, dtype=float)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    stats = {"latency_p50_ms": float(p50), "latency_p95_ms": float(p95), "latency_p99_ms": float(p99),
             "latency_cv": _cv(values)}
    if pass_p50_ms is not None and len(pass_p50_ms) >= 2:
        stats["latency_repeat_cv"] = _cv(np.asarray(pass_p50_ms, dtype=float))
    return stats


def _cv(values: np.ndarray) -> float:
    mean = float(values.mean())
    return float(values.std() / mean) if mean > 0 else 0.0


def call_metrics(timed, batch1=None) -> dict[str, float]:
    """An arm's contract metrics from its measured calls, besides quality: tokens, latency, throughput, failures.

    A call that failed for good (an API error after its retries) counts as wrong in the quality metrics and in
    `failed_rate` (`failed_calls` of `calls`), and nowhere else: latency, throughput and tokens are the answered
    calls' (throughput: answered calls per second of the pass), so a server that fails fast does not look fast
    and a failure's estimated prompt is not priced. With no answered call there are none. Latency means what
    one caller waits: with `batch1` (the sample timed one call at a time, for an arm that batches) the
    percentiles are that sample's, and the batched pass's are `..._batched`; throughput is always the batched
    pass's.
    """
    calls = timed.calls
    metrics: dict[str, float] = {}
    answered = [c for c in calls if c.error is None]
    metrics["calls"] = float(len(calls))
    metrics["failed_calls"] = float(len(calls) - len(answered))
    metrics["failed_rate"] = metrics["failed_calls"] / len(calls)
    if not answered:
        return metrics
    one_at_a_time = batch1 or timed
    timed_ok = [c for c in one_at_a_time.calls if c.error is None] or answered
    metrics.update(latency_stats([c.latency_ms for c in timed_ok], one_at_a_time.pass_p50_ms))
    metrics["latency_calls_timed"] = float(len(timed_ok))
    if batch1 is not None:
        batched = latency_stats([c.latency_ms for c in answered])
        metrics["latency_p50_ms_batched"] = batched["latency_p50_ms"]
        metrics["latency_p95_ms_batched"] = batched["latency_p95_ms"]
        metrics["throughput_calls_per_s_batch1"] = batch1.throughput_calls_per_s
    n = len(answered)
    metrics["prompt_tokens_mean"] = sum(c.prompt_tokens for c in answered) / n
    metrics["completion_tokens_mean"] = sum(c.completion_tokens for c in answered) / n
    metrics["cached_tokens_mean"] = sum(c.cached_tokens for c in answered) / n
    metrics["throughput_calls_per_s"] = n / timed.seconds if timed.seconds > 0 else 0.0
    ttft = [c.ttft_ms for c in answered if c.ttft_ms is not None]
    if ttft:
        metrics["ttft_p50_ms"] = float(np.percentile(ttft, 50))
    return metrics
