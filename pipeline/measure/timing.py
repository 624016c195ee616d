"""Measuring an arm the same way whatever its backend: warm-up, timed passes, latency and throughput.

Warm-up calls run untimed first, at least one full batch (or the backend's concurrency), so
one-off costs (allocations at the timed batch size, connection set-up, the prefix cache) stay out
of the figures; then `repeats` timed passes run over all prompts. Answers come from the first pass;
each call's latency is its median over the passes, and throughput is the rows divided by the
median pass time, less the time the caller's own bookkeeping (`on_calls`: parsing, writing
predictions, progress) took inside the pass.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from pipeline import interrupts
from pipeline.backends.base import Backend, Call, OnCalls
from pipeline.task.prompts import Prompt


@dataclass
class Measurement:
    """The calls of one evaluation and how long they took.

    `seconds` is the median pass; `pass_p50_ms` holds each pass's p50 latency (their spread
    says how noisy the timing is on this machine).
    """

    calls: list[Call]
    seconds: float
    pass_p50_ms: list[float]

    @property
    def throughput_calls_per_s(self) -> float:
        return len(self.calls) / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def joined(cls, rounds: list["Measurement"]) -> "Measurement":
        """Rounds measured one after another over consecutive rows as one measurement: their calls in order,
        their (median) pass times added, and each round's passes' p50 as passes of their own."""
        return cls([c for r in rounds for c in r.calls], sum(r.seconds for r in rounds),
                   [p for r in rounds for p in r.pass_p50_ms])


class EnoughRows(Exception):
    """Raised by an `on_calls` callback when the rows answered so far are enough: the pass ends there."""


def measure(backend: Backend, prompts: list[Prompt], warmup: int = 0, repeats: int = 1,
            on_calls: OnCalls | None = None) -> Measurement:
    """Warm up on the first `warmup` prompts, then time `repeats` passes over all of them. Where the first
    pass's `on_calls` raises `EnoughRows`, that pass ends with the rows answered so far and the later passes
    time those rows."""
    if warmup:
        backend.run(prompts[: max(warmup, backend.calls_in_flight)])
    calls: list[Call] = []
    latencies: list[list[float]] = [[] for _ in prompts]
    pass_seconds, pass_p50_ms = [], []
    bookkeeping = [0.0]
    delivered: list[Call] = []
    handovers: list[tuple[float, int]] = []  # (time less bookkeeping, calls handed over so far)

    def timed_apart(batch: list[Call]) -> None:
        delivered.extend(batch)
        started = time.perf_counter()
        handovers.append((started - bookkeeping[0], len(delivered)))
        try:
            on_calls(batch)
        finally:
            bookkeeping[0] += time.perf_counter() - started

    for repeat in range(max(repeats, 1)):
        bookkeeping[0] = 0.0
        started = time.perf_counter()
        # Later passes only time; they stop on Ctrl-C like the first (whose callback checks it).
        first = timed_apart if on_calls else None
        try:
            results = backend.run(prompts, first if repeat == 0 else lambda _calls: interrupts.check())
            pass_seconds.append(time.perf_counter() - started - bookkeeping[0])
        except EnoughRows:
            results = list(delivered)
            prompts, latencies = prompts[: len(results)], latencies[: len(results)]
            pass_seconds.append(_steady_seconds(handovers, time.perf_counter() - started - bookkeeping[0]))
        if repeat == 0:
            calls = results
        # A failed call's time measures the failure, not the model: each row's latency is its answered passes'.
        for i, call in enumerate(results):
            if call.error is None:
                latencies[i].append(call.latency_ms)
        answered = [call.latency_ms for call in results if call.error is None]
        if answered:
            pass_p50_ms.append(statistics.median(answered))
    for call, lat in zip(calls, latencies):
        if lat:
            call.latency_ms = statistics.median(lat)
    return Measurement(calls, statistics.median(pass_seconds), pass_p50_ms)


def _steady_seconds(handovers: list[tuple[float, int]], elapsed: float) -> float:
    """The time a pass stopped early would take at its steady rate: the calls handed over between the first and
    the last handover, over the time between them, for all of them. A short stopped pass timed whole would count
    the batch filling up at its start and the calls still in the batch when it stopped (dropped unfinished) as
    time per answer (README, "Sequential evaluation")."""
    (t0, n0), (t1, n1) = handovers[0], handovers[-1]
    if n1 <= n0 or t1 <= t0:
        return elapsed
    return (t1 - t0) / (n1 - n0) * n1


def median_known(latencies_ms: list[float], within: float = 0.10, confidence: float = 0.95) -> bool:
    """Whether the median latency is known to within `within` of itself: its distribution-free interval (from
    order statistics, scipy's quantile test) is that narrow: about 8 calls where latencies vary by a few percent,
    more where they vary more."""
    from scipy.stats import quantile_test

    if len(latencies_ms) < 2:
        return False
    median = statistics.median(latencies_ms)
    ci = quantile_test(latencies_ms, q=median, p=0.5).confidence_interval(confidence)
    return (ci.high - ci.low) / 2 <= within * median


def timing_sample(backend: Backend, prompts: list[Prompt], warmup: int, repeats: int, most: int,
                  step: int = 8) -> Measurement:
    """The first prompts timed `step` at a time until the median latency is known (`median_known`) or `most`
    have run: a latency sample sized to what its median needs, not fixed."""
    rounds: list[Measurement] = []
    start = 0
    while start < min(most, len(prompts)):
        end = min(start + step, most, len(prompts))
        rounds.append(measure(backend, prompts[start:end], warmup=warmup if start == 0 else 0, repeats=repeats))
        start = end
        if median_known([c.latency_ms for r in rounds for c in r.calls if c.error is None]):
            break
    return Measurement.joined(rounds)
