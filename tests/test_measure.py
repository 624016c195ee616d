"""The measurement protocol, whatever the backend: warm-up untimed, answers from the first pass,
each call's latency its median over the passes, throughput over the median pass."""

import itertools

import pytest

from pipeline.measure import timing as measure_module
from pipeline.backends.base import Call
from pipeline.measure.timing import measure
from pipeline.task.prompts import Prompt


class ScriptedBackend:
    """Answers with the pass number and reports scripted latencies, one list per pass."""

    kind, tokens_estimated, retries_total = "scripted", False, None

    def __init__(self, latencies_per_pass, calls_in_flight=1):
        self.latencies = list(latencies_per_pass)
        self.calls_in_flight = calls_in_flight
        self.passes: list[int] = []

    def run(self, prompts, on_calls=None):
        self.passes.append(len(prompts))
        latencies = self.latencies.pop(0)
        calls = [Call(f"pass{len(self.passes)}-{p.text}", 1, 1, latency) for p, latency in zip(prompts, latencies)]
        if on_calls:
            on_calls(calls)
        return calls

    def uncached(self):
        return None

    def at_batch_size(self, batch_size):
        return None

    def close(self):
        pass


def test_each_call_gets_its_median_over_the_passes_and_answers_come_from_the_first(monkeypatch):
    prompts = [Prompt(text=str(i)) for i in range(3)]
    # warm-up, then three timed passes whose latencies differ per call
    backend = ScriptedBackend([[999.0], [10.0, 50.0, 7.0], [30.0, 20.0, 9.0], [20.0, 40.0, 1000.0]])
    # perf_counter: each pass's start and end, and around the first pass's bookkeeping (on_calls, 1 s of it),
    # so passes last 7 - 1 = 6 s, 2 s and 4 s.
    clock = itertools.chain([0.0, 1.0, 2.0, 7.0, 10.0, 12.0, 20.0, 24.0])
    monkeypatch.setattr(measure_module.time, "perf_counter", lambda: next(clock))
    seen = []
    result = measure(backend, prompts, warmup=1, repeats=3, on_calls=seen.extend)
    assert backend.passes == [1, 3, 3, 3]  # one warm-up call, then every prompt per pass
    assert [c.latency_ms for c in result.calls] == [20.0, 40.0, 9.0]  # medians, not means (9 not 338.7)
    assert [c.output for c in result.calls] == ["pass2-0", "pass2-1", "pass2-2"]
    assert [c.output for c in seen] == ["pass2-0", "pass2-1", "pass2-2"]  # on_calls sees the first timed pass
    assert result.seconds == 4.0  # the median pass, the caller's bookkeeping left out
    assert result.throughput_calls_per_s == pytest.approx(3 / 4.0)
    assert result.pass_p50_ms == [10.0, 20.0, 40.0]


def test_one_pass_keeps_the_measured_latencies():
    backend = ScriptedBackend([[5.0, 6.0]])
    result = measure(backend, [Prompt(text="a"), Prompt(text="b")])
    assert [c.latency_ms for c in result.calls] == [5.0, 6.0] and len(result.pass_p50_ms) == 1


def test_warm_up_runs_at_least_one_full_batch():
    """The first timed batch must not pay for allocations at a batch size the warm-up never ran."""
    prompts = [Prompt(text=str(i)) for i in range(6)]
    backend = ScriptedBackend([[1.0] * 4, [1.0] * 6], calls_in_flight=4)
    measure(backend, prompts, warmup=1)
    assert backend.passes == [4, 6]


class BatchingBackend:
    """Hands calls over in chunks of `chunk`: the first after `fill_s` (the batch filling up), then one every
    `every_s`; the clock is simulated, so the test reads exact times."""

    kind, tokens_estimated, retries_total, calls_in_flight = "batching", False, None, 1

    def __init__(self, now: list[float], chunk: int, fill_s: float, every_s: float):
        self.now, self.chunk, self.fill_s, self.every_s = now, chunk, fill_s, every_s

    def run(self, prompts, on_calls=None):
        calls = []
        for start in range(0, len(prompts), self.chunk):
            self.now[0] += self.fill_s if start == 0 else self.every_s
            batch = [Call(p.text, 1, 1, 10.0) for p in prompts[start: start + self.chunk]]
            calls += batch
            if on_calls:
                on_calls(batch)
        self.now[0] += 5.0  # the calls still in the batch when a stopped pass ends: unfinished, dropped
        return calls


def test_a_pass_stopped_early_is_timed_at_its_steady_rate_not_with_its_ramp_and_dropped_calls(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(measure_module.time, "perf_counter", lambda: now[0])
    prompts = [Prompt(text=str(i)) for i in range(320)]
    handed = []

    def enough_at_96(calls):
        handed.extend(calls)
        if len(handed) >= 96:
            raise measure_module.EnoughRows

    # 32 calls after 3 s of filling, then 32 every second: 64 calls in the 2 s after the first handover.
    stopped = measure(BatchingBackend(now, 32, 3.0, 1.0), prompts, on_calls=enough_at_96)
    assert len(stopped.calls) == 96
    assert stopped.throughput_calls_per_s == pytest.approx(32.0)
    # The same backend over every row is timed whole: 3 s + 9 s + the 5 s drain, 320 calls.
    whole = measure(BatchingBackend(now, 32, 3.0, 1.0), prompts, on_calls=lambda calls: None)
    assert whole.throughput_calls_per_s == pytest.approx(320 / 17.0)
