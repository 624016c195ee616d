"""Measuring one arm on the test rows: every row through its backend, timed by the protocol, parsed and
scored, with predictions written as they come; then the samples that say what batching and the prefix
cache are worth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from pipeline import interrupts
from pipeline.backends.base import Backend
from pipeline.experiment.arms import Arm
from pipeline.experiment.config import SequentialConfig
from pipeline.measure.scoring import call_metrics, latency_stats, read_predictions
from pipeline.measure.sequential import SequentialRule, confidence_sequence, round_sizes, stop_reason
from pipeline.measure.timing import EnoughRows, Measurement, measure, timing_sample
from pipeline.recipe.inputs import RunInputs
from pipeline.task.prompts import PromptRenderer


def evaluate(inputs: RunInputs, arm: Arm, backend: Backend, renderer: PromptRenderer, predictions: Path,
             console: Any, paired_with: np.ndarray | None = None) -> tuple[dict[str, float], str]:
    """Measure the test rows on the backend, parse and score them; predictions are written as they come
    (so they are kept on Ctrl-C), one row per test row evaluated, in the test rows' order.

    With `eval.sequential` the rule is checked every `step_rows` rows and the arm stops once its primary
    metric's confidence sequence is narrower than `half_width` ("interval") or, given `paired_with` (the compare
    pair's other arm's row scores on the same rows), once their difference's excludes 0 ("decided"); else
    "all_rows". A primary that is not a mean over rows (field-F1) has no such sequence: every row is scored."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    texts, golds = inputs.rows["text"], inputs.rows["label"]
    prompts = [renderer.prompt(t) for t in texts]
    predictions.parent.mkdir(parents=True, exist_ok=True)
    kind = inputs.kind(arm)
    scored, outputs = [], []
    row_scores = []  # each row's share of the primary metric (1/0 correct, its chrF), as the sequential rule reads it
    rule = sequential_rule(arm.eval.sequential, inputs.cfg.stats.confidence) if kind.row_mean else None
    with predictions.open("w", encoding="utf-8") as out, \
            Progress(TextColumn(f"evaluating {arm.name:<12}"), BarColumn(), MofNCompleteColumn(),
                     TimeRemainingColumn(), console=console, transient=True) as bar:
        job = bar.add_task(arm.name, total=len(prompts))

        def on_calls(calls) -> None:
            interrupts.check()
            for call in calls:
                i = len(scored)
                scored.append(kind.score(call.output, golds[i]))
                outputs.append(call.output)
                row_scores.append(scored[i].score)
                out.write(json.dumps(prediction_row(i, texts[i], golds[i], call, kind.prediction_fields(scored[i])),
                                     ensure_ascii=False) + "\n")
            out.flush()
            bar.advance(job, len(calls))

        try:
            timed, stopped_by = _until_known(backend, prompts, arm, rule, on_calls, row_scores, paired_with)
        except KeyboardInterrupt:
            out.flush()
            mlflow.log_artifact(str(predictions))  # the rows finished before the interrupt
            raise
    prompts = prompts[: len(scored)]  # the rows evaluated: the timing samples come from them
    batch1 = _batch1_sample(backend, prompts, arm)
    metrics = kind.metrics(scored, list(golds[: len(scored)]), outputs)
    metrics.update(call_metrics(timed, batch1))
    metrics["rows_evaluated"] = float(len(scored))
    if rule is not None:  # the interval valid at the stopping time, however often the run looked
        low, high = confidence_sequence(row_scores, rule.alpha)
        metrics[f"{kind.primary}_cs_low"], metrics[f"{kind.primary}_cs_high"] = float(low[-1]), float(high[-1])
    if batch1 is not None:
        _record_batch1_latencies(predictions, batch1.calls)
    metrics["prefix_tokens"] = float(renderer.static_prefix_tokens()) if renderer.tokenizer else 0.0
    if backend.tokens_estimated:
        metrics["tokens_estimated"] = 1.0
    if backend.retries_total is not None:
        metrics["retries_total"] = float(backend.retries_total)
    metrics.update(_uncached_sample(backend, prompts, arm, timed, at_batch1=batch1 is not None))
    return metrics, stopped_by


def sequential_rule(sequential: SequentialConfig | None, confidence: float) -> SequentialRule | None:
    """The stopping rule of `eval.sequential` at the run's confidence; None: every row."""
    if sequential is None:
        return None
    return SequentialRule(sequential.min_rows, sequential.step_rows, sequential.half_width, 1 - confidence)


def _until_known(backend: Backend, prompts: list, arm: Arm, rule: SequentialRule | None, on_calls,
            row_scores: list[float], paired_with: np.ndarray | None) -> tuple[Measurement, str]:
    """The rows measured in one pass that ends, with a rule, at the first check (`round_sizes`) where the rule
    says stop. One pass rather than a pass per round: a batching backend keeps its batch full to the stop."""
    checks = round_sizes(len(prompts), rule)[:-1] if rule is not None else []
    stopped_by = ["all_rows"]

    def checked(calls) -> None:
        on_calls(calls)
        while checks and len(row_scores) >= checks[0]:
            checks.pop(0)
            reason = stop_reason(row_scores, rule, paired_with)
            if reason is not None:
                stopped_by[0] = reason
                raise EnoughRows

    timed = measure(backend, prompts, warmup=min(arm.eval.warmup, len(prompts)), repeats=arm.eval.repeats,
                    on_calls=checked)
    return timed, stopped_by[0]


def _uncached_sample(backend: Backend, prompts, arm: Arm, timed: Measurement, at_batch1: bool) -> dict[str, float]:
    """The first rows again without the prefix cache: what the cache saves, and a check it changes nothing.
    Timed as `latency_p50_ms` is (one call at a time where the arm's latency is), so the two compare."""
    plain = backend.uncached() if arm.eval.uncached_sample else None
    if plain is None:
        return {}
    plain = (plain.at_batch_size(1) or plain) if at_batch1 else plain
    # Warmed like the cached pass, so neither pays one-off costs the other does not.
    calls = timing_sample(plain, prompts, min(arm.eval.warmup, arm.eval.uncached_sample), arm.eval.repeats,
                          arm.eval.uncached_sample).calls
    out = {"prefix_cache_agreement": sum(a.output == b.output for a, b in zip(calls, timed.calls)) / len(calls)}
    answered = [c.latency_ms for c in calls if c.error is None]
    if answered:  # a failed call's time is not a latency
        out["latency_p50_ms_uncached"] = latency_stats(answered)["latency_p50_ms"]
    return out


def _batch1_sample(backend: Backend, prompts, arm: Arm) -> Measurement | None:
    """The first rows again one call at a time (a local arm that batches): what one interactive caller waits
    (the latency percentiles), and the throughput, so the cost, of serving without batching."""
    one_at_a_time = backend.at_batch_size(1) if arm.eval.batch_size > 1 and arm.eval.batch1_sample else None
    if one_at_a_time is None:
        return None
    return timing_sample(one_at_a_time, prompts, min(arm.eval.warmup, arm.eval.batch1_sample), arm.eval.repeats,
                         arm.eval.batch1_sample)


def _record_batch1_latencies(predictions: Path, calls: list) -> None:
    """Each sampled row's latency at batch 1 beside its latency in the batched pass (`latency_ms`)."""
    rows = read_predictions(predictions)
    for row, call in zip(rows, calls):
        row["latency_ms_batch1"] = round(call.latency_ms, 3)
    partial = predictions.with_suffix(".jsonl.tmp")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    partial.replace(predictions)  # an interrupt leaves the old file whole


def prediction_row(row_id: int, text: str, gold: str, call, answer: dict) -> dict:
    """One `predictions.jsonl` row: the input, the target, the raw output, what the task type read and scored
    (`answer`), tokens and latency, and the error of a call that failed."""
    row = {"row_id": row_id, "input": text, "gold": gold, "raw_output": call.output, **answer,
           "prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
           "cached_tokens": call.cached_tokens, "latency_ms": round(call.latency_ms, 3)}
    if call.error:
        row["error"] = call.error
    if call.retries:
        row["retries"] = call.retries
    return row
