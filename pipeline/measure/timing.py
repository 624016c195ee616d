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


def measure(backend: Backend, prompts: list[Prompt], warmup: int = 0, repeats: int = 1,
            on_calls: OnCalls | None = None) -> Measurement:
    """Warm up on the first `warmup` prompts, then time `repeats` passes over all of them."""
    if warmup:
        backend.run(prompts[: max(warmup, backend.calls_in_flight)])
    calls: list[Call] = []
    latencies: list[list[float]] = [[] for _ in prompts]
    pass_seconds, pass_p50_ms = [], []
    bookkeeping = [0.0]

    def timed_apart(batch: list[Call]) -> None:
        started = time.perf_counter()
        on_calls(batch)
        bookkeeping[0] += time.perf_counter() - started

    for repeat in range(max(repeats, 1)):
        bookkeeping[0] = 0.0
        started = time.perf_counter()
        # Later passes only time; they stop on Ctrl-C like the first (whose callback checks it).
        first = timed_apart if on_calls else None
        results = backend.run(prompts, first if repeat == 0 else lambda _calls: interrupts.check())
        pass_seconds.append(time.perf_counter() - started - bookkeeping[0])
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
