"""Measuring one arm on the test rows: every row through its backend, timed by the protocol, parsed and
scored, with predictions written as they come; then the samples that say what batching and the prefix
cache are worth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from pipeline import interrupts
from pipeline.backends.base import Backend
from pipeline.experiment.arms import Arm
from pipeline.measure.scoring import PARSERS, call_metrics, latency_stats, read_predictions
from pipeline.measure.timing import Measurement, measure
from pipeline.recipe.inputs import RunInputs
from pipeline.task.prompts import PromptRenderer


def evaluate(inputs: RunInputs, arm: Arm, backend: Backend, renderer: PromptRenderer, predictions: Path,
             console: Any) -> dict[str, float]:
    """Measure every test row on the backend, parse and score it; predictions are written as they come
    (so they are kept on Ctrl-C), one row per test row, in test-row order."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    texts, golds = inputs.rows["text"], inputs.rows["label"]
    prompts = [renderer.prompt(t) for t in texts]
    predictions.parent.mkdir(parents=True, exist_ok=True)
    parse, predicted = PARSERS[arm.eval.parser], []
    with predictions.open("w", encoding="utf-8") as out, \
            Progress(TextColumn(f"evaluating {arm.name:<12}"), BarColumn(), MofNCompleteColumn(),
                     TimeRemainingColumn(), console=console, transient=True) as bar:
        job = bar.add_task(arm.name, total=len(prompts))

        def on_calls(calls) -> None:
            interrupts.check()
            for call in calls:
                i = len(predicted)
                predicted.append(parse(call.output, inputs.labels))
                out.write(json.dumps(prediction_row(i, texts[i], golds[i], call, predicted[i], inputs.labels),
                                     ensure_ascii=False) + "\n")
            out.flush()
            bar.advance(job, len(calls))

        try:
            timed = measure(backend, prompts, warmup=min(arm.eval.warmup, len(prompts)), repeats=arm.eval.repeats,
                            on_calls=on_calls)
        except KeyboardInterrupt:
            out.flush()
            mlflow.log_artifact(str(predictions))  # the rows finished before the interrupt
            raise
    batch1 = _batch1_sample(backend, prompts, arm)
    metrics = call_metrics(timed, predicted, [inputs.labels.index(g) for g in golds], inputs.labels, batch1)
    if batch1 is not None:
        _record_batch1_latencies(predictions, batch1.calls)
    metrics["prefix_tokens"] = float(renderer.static_prefix_tokens()) if renderer.tokenizer else 0.0
    if backend.tokens_estimated:
        metrics["tokens_estimated"] = 1.0
    if backend.retries_total is not None:
        metrics["retries_total"] = float(backend.retries_total)
    metrics.update(_uncached_sample(backend, prompts, arm, timed, at_batch1=batch1 is not None))
    return metrics


def _uncached_sample(backend: Backend, prompts, arm: Arm, timed: Measurement, at_batch1: bool) -> dict[str, float]:
    """The first rows again without the prefix cache: what the cache saves, and a check it changes nothing.
    Timed as `latency_p50_ms` is (one call at a time where the arm's latency is), so the two compare."""
    plain = backend.uncached() if arm.eval.uncached_sample else None
    if plain is None:
        return {}
    plain = (plain.at_batch_size(1) or plain) if at_batch1 else plain
    sample = prompts[: arm.eval.uncached_sample]
    # Warmed like the cached pass, so neither pays one-off costs the other does not.
    calls = measure(plain, sample, warmup=min(arm.eval.warmup, len(sample)), repeats=arm.eval.repeats).calls
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
    sample = prompts[: arm.eval.batch1_sample]
    return measure(one_at_a_time, sample, warmup=min(arm.eval.warmup, len(sample)),
                   repeats=arm.eval.repeats)


def _record_batch1_latencies(predictions: Path, calls: list) -> None:
    """Each sampled row's latency at batch 1 beside its latency in the batched pass (`latency_ms`)."""
    rows = read_predictions(predictions)
    for row, call in zip(rows, calls):
        row["latency_ms_batch1"] = round(call.latency_ms, 3)
    partial = predictions.with_suffix(".jsonl.tmp")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    partial.replace(predictions)  # an interrupt leaves the old file whole


def prediction_row(row_id: int, text: str, gold: str, call, parsed: int, labels: list[str]) -> dict:
    row = {"row_id": row_id, "input": text, "gold": gold, "raw_output": call.output,
           "parsed_label": labels[parsed] if parsed >= 0 else None,
           "correct": parsed >= 0 and labels[parsed] == gold,
           "prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
           "cached_tokens": call.cached_tokens, "latency_ms": round(call.latency_ms, 3)}
    if call.error:
        row["error"] = call.error
    if call.retries:
        row["retries"] = call.retries
    return row
