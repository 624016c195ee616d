"""Cost and break-even math. Pure functions of measured numbers and prices; no I/O.

Two ways an arm is paid for: by usage (an API's tokens, a per-call price) and by deployment
(self-hosted replicas billed by the hour whether busy or not). An `ArmCost` holds both parts, so
monthly cost, cost per call at a volume and both break-evens come from one place.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator


SECONDS_PER_HOUR = 3600.0
HOURS_PER_MONTH = 730.0  # 365 * 24 / 12


@dataclass(frozen=True)
class Deployment:
    """Self-hosted replicas: each costs `usd_per_hour` around the clock; `min_replicas` are always on, and
    a replica is planned to be `target_utilisation` busy (headroom for peaks)."""

    usd_per_hour: float
    min_replicas: int = 1
    target_utilisation: float = 0.6

    def capacity(self, throughput_calls_per_s: float, hours: float = HOURS_PER_MONTH) -> float:
        """Calls one replica serves in a month at the planned utilisation."""
        return throughput_calls_per_s * SECONDS_PER_HOUR * hours * self.target_utilisation

    def replicas(self, monthly_calls: float, throughput_calls_per_s: float, hours: float = HOURS_PER_MONTH) -> int:
        """max(always-on replicas, replicas the volume needs at the measured throughput and utilisation)."""
        if throughput_calls_per_s <= 0:
            raise ValueError("throughput must be positive")
        needed = math.ceil(monthly_calls / self.capacity(throughput_calls_per_s, hours) - 1e-12)
        return max(self.min_replicas, needed)


@dataclass(frozen=True)
class ArmCost:
    """How one arm is paid for: `per_call_usd` of usage plus, when self-hosted, a deployment at the
    measured throughput; `fixed_usd` once (training, labelling, prompt work)."""

    per_call_usd: float = 0.0
    deployment: Deployment | None = None
    throughput_calls_per_s: float = 0.0
    fixed_usd: float = 0.0
    hours_per_month: float = HOURS_PER_MONTH
    linear: ClassVar[bool] = True  # monthly cost is linear in the volume between two `steps`

    def steps(self, max_calls: float) -> list[float]:
        """Volumes below `max_calls` at which a replica is added (the monthly cost jumps), in order."""
        return list(_steps(self, max_calls))

    def replicas(self, monthly_calls: float) -> int | None:
        if self.deployment is None:
            return None
        return self.deployment.replicas(monthly_calls, self.throughput_calls_per_s, self.hours_per_month)

    def monthly(self, monthly_calls: float) -> float:
        """USD a month at this volume: usage plus every replica's hours."""
        hosting = 0.0
        if self.deployment is not None:
            hosting = self.replicas(monthly_calls) * self.hours_per_month * self.deployment.usd_per_hour
        return monthly_calls * self.per_call_usd + hosting

    def per_call(self, monthly_calls: float) -> float:
        """USD per call at this monthly volume (hosting spread over the calls it serves)."""
        return self.monthly(monthly_calls) / monthly_calls

    def scaled(self, **factors: float) -> "ArmCost":
        """A copy with some inputs multiplied (for sensitivity): per_call_usd, usd_per_hour, throughput, fixed_usd."""
        deployment = self.deployment
        if deployment is not None and "usd_per_hour" in factors:
            deployment = Deployment(deployment.usd_per_hour * factors["usd_per_hour"], deployment.min_replicas,
                                    deployment.target_utilisation)
        return ArmCost(self.per_call_usd * factors.get("per_call_usd", 1.0), deployment,
                       self.throughput_calls_per_s * factors.get("throughput", 1.0),
                       self.fixed_usd * factors.get("fixed_usd", 1.0), self.hours_per_month)


def quality_adjusted_per_call(per_call_usd: float, accuracy: float, error_cost_usd: float) -> float:
    """Cost per call counting each wrong answer at `error_cost_usd` (invalid answers are wrong)."""
    return per_call_usd + (1.0 - accuracy) * error_cost_usd


def one_off_break_even(baseline: ArmCost, candidate: ArmCost, monthly_calls: float) -> "BreakEven":
    """Total calls until the candidate's extra fixed cost is paid back by its saving per call, with both
    arms' per-call costs taken at the configured monthly volume (see `break_even`)."""
    return break_even(baseline.fixed_usd, baseline.per_call(monthly_calls), candidate.fixed_usd,
                      candidate.per_call(monthly_calls), monthly_calls)


def monthly_break_even(baseline: ArmCost, candidate: ArmCost, max_calls: float,
                       max_replicas: int = 100_000) -> float | None:
    """The lowest monthly volume above which the candidate costs less a month than the baseline, at every
    volume up to `max_calls` (or up to `max_replicas` replicas of either arm); None if there is none.

    Both monthly costs are piecewise linear in the volume: a slope from usage, a step at every replica
    added. Between two consecutive steps of either arm the difference is linear, so each segment is
    solved exactly. A replica step can make the candidate dearer again, so every segment is visited and
    a later one that is not cheaper throughout cancels an earlier answer.
    """
    for arm in (baseline, candidate):
        if arm.deployment is not None:
            capacity = arm.deployment.capacity(arm.throughput_calls_per_s, arm.hours_per_month)
            max_calls = min(max_calls, capacity * (arm.deployment.min_replicas + max_replicas))
    steps = heapq.merge(_steps(baseline, max_calls), _steps(candidate, max_calls), [max_calls])
    slope = candidate.per_call_usd - baseline.per_call_usd
    lo, answer = 0.0, None
    for hi in steps:
        if hi <= lo:
            continue
        inside = lo + min(1.0, (hi - lo) / 2)  # a volume in (lo, hi]: it has the segment's replica counts
        d0 = _hosting(candidate, inside) - _hosting(baseline, inside)  # difference = d0 + slope * volume
        start, end = d0 + slope * lo, d0 + slope * hi
        if start >= 0 or end >= 0:
            answer = None  # not cheaper somewhere in this segment
        if end < 0 and answer is None:
            answer = lo if start < 0 else -d0 / slope  # cheaper from the segment's start, or from the root
        lo = hi
    return answer


def _hosting(cost: ArmCost, monthly_calls: float) -> float:
    return cost.monthly(monthly_calls) - cost.per_call_usd * monthly_calls


def _steps(cost: ArmCost, max_calls: float) -> Iterator[float]:
    """Volumes at which the arm adds a replica beyond its always-on ones, in order, up to `max_calls`."""
    if cost.deployment is None:
        return
    capacity = cost.deployment.capacity(cost.throughput_calls_per_s, cost.hours_per_month)
    k = cost.deployment.min_replicas
    while capacity * k < max_calls:
        yield capacity * k
        k += 1


def sensitivity(evaluate: Callable[[dict[str, float]], float | None], factors: list[str],
                spread: float = 0.5) -> list[tuple[str, float | None, float | None]]:
    """For each factor, the figure `evaluate` gives with that factor alone at (1 - spread) and (1 + spread)
    times its measured value: the rows of a tornado chart. `evaluate` takes {factor: multiplier}."""
    return [(name, evaluate({name: 1.0 - spread}), evaluate({name: 1.0 + spread})) for name in factors]


@dataclass(frozen=True)
class BreakEven:
    calls: float | None  # None: fine-tuning never pays off
    payback_months: float | None

    @property
    def never(self) -> bool:
        return self.calls is None


def break_even(
    fixed_prompt: float, per_call_prompt: float, fixed_finetune: float, per_call_finetuned: float, monthly_calls: float
) -> BreakEven:
    """Calls after which the fine-tuned route's total cost drops below the prompt route's.

    break_even_calls = (fixed_finetune - fixed_prompt) / (per_call_prompt - per_call_finetuned).
    Never when the fine-tuned arm saves nothing per call; 0 when it is also no dearer up front.
    """
    saving = per_call_prompt - per_call_finetuned
    if saving <= 0:
        return BreakEven(None, None)
    calls = max(0.0, (fixed_finetune - fixed_prompt) / saving)
    return BreakEven(calls, calls / monthly_calls)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or nan where the denominator is zero."""
    return numerator / denominator if denominator else math.nan
