"""Each route's whole cost over a horizon, the volumes and months from which fine-tuning pays, the points of
the cost chart and the verdict. Pure functions of costs already priced; no I/O.

A route is a running cost a month (an `ArmCost`, or a `serving` deployment: anything with `monthly(calls)`,
`steps(max_calls)` and `linear`) plus what it costs to build once and to rebuild now and then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping, Protocol

State = Literal["cheaper", "tied", "dearer"]
TOLERANCE = 1e-9  # relative: two totals closer than this share of their size are tied


class RunningCost(Protocol):
    linear: bool  # the monthly cost is linear in the volume between two consecutive `steps`

    def monthly(self, monthly_calls: float) -> float: ...

    def steps(self, max_calls: float) -> list[float]: ...


@dataclass(frozen=True)
class Route:
    """One way to answer the task: its running cost a month plus its fixed costs.

    one_off_usd    = people_hours x people_usd_per_hour + labelling_usd + training_usd x search_runs + evaluation_usd
    retraining_usd = training_usd + retrain_labelling_usd + retrain_people_hours x people_usd_per_hour,
    paid every `retrain_every_months` (None: never). `running.fixed_usd` (an ArmCost's) is not counted: the
    one-offs live here, once.
    """

    running: RunningCost
    people_hours: float = 0.0
    people_usd_per_hour: float = 0.0
    labelling_usd: float = 0.0
    training_usd: float = 0.0
    search_runs: int = 1
    evaluation_usd: float = 0.0
    retrain_every_months: float | None = None
    retrain_labelling_usd: float = 0.0
    retrain_people_hours: float = 0.0

    @property
    def one_off_usd(self) -> float:
        return (self.people_hours * self.people_usd_per_hour + self.labelling_usd
                + self.training_usd * self.search_runs + self.evaluation_usd)

    @property
    def retraining_usd(self) -> float:
        return self.training_usd + self.retrain_labelling_usd + self.retrain_people_hours * self.people_usd_per_hour

    def retrainings(self, months: float) -> int:
        """Retrainings at months e, 2e, ... strictly before `months` (none at the start, none at the very end,
        where it would buy nothing): ceil(months / e) - 1."""
        if not self.retrain_every_months or months <= 0:
            return 0
        return max(0, math.ceil(months / self.retrain_every_months - 1e-12) - 1)

    def fixed_usd(self, months: float) -> float:
        """One-off plus every retraining within `months`."""
        return self.one_off_usd + self.retrainings(months) * self.retraining_usd


def horizon_cost(route: Route, monthly_calls: float, horizon_months: float) -> float:
    """Total cost of ownership: fixed_usd(horizon) + horizon_months x running.monthly(monthly_calls)."""
    if horizon_months < 0 or monthly_calls < 0:
        raise ValueError("the horizon and the volume must not be negative")
    return route.fixed_usd(horizon_months) + horizon_months * route.running.monthly(monthly_calls)


@dataclass(frozen=True)
class CostRange:
    start: float  # monthly calls, exclusive
    end: float  # inclusive
    state: State  # the candidate against the baseline, over the horizon


@dataclass(frozen=True)
class VolumeBreakEven:
    calls: float | None  # None: never (up to max_calls); 0: from the first call
    ranges: tuple[CostRange, ...]

    @property
    def never(self) -> bool:
        return self.calls is None


def break_even_monthly_calls(baseline: Route, candidate: Route, horizon_months: float,
                             max_calls: float) -> VolumeBreakEven:
    """The lowest monthly volume above which the candidate's horizon total is lower than the baseline's at
    every volume up to `max_calls`, fixed costs included; and the ranges where it is cheaper, tied or dearer.

    difference(V) = horizon_cost(candidate, V) - horizon_cost(baseline, V). Between two consecutive steps of
    either route (a replica added, a batching regime or a billing kink) it is linear for linear routes and is
    solved exactly; otherwise (cold starts) its roots are found by bisection on a 48-point grid. Totals within
    TOLERANCE of each other are tied; a tie is not cheaper, so a tie ends the answer as a dearer range does.
    """
    if max_calls <= 0:
        raise ValueError("max_calls must be positive")

    def diff(v: float) -> float:
        return horizon_cost(candidate, v, horizon_months) - horizon_cost(baseline, v, horizon_months)

    def tol(v: float) -> float:
        return TOLERANCE * (1.0 + horizon_cost(candidate, v, horizon_months) + horizon_cost(baseline, v,
                                                                                             horizon_months))

    inner = baseline.running.steps(max_calls) + candidate.running.steps(max_calls)
    knots = sorted({0.0, max_calls, *(s for s in inner if 0 < s < max_calls)})
    linear = baseline.running.linear and candidate.running.linear
    ranges: list[CostRange] = []
    for lo, hi in zip(knots, knots[1:]):
        ranges += _segment_ranges(diff, lo, hi, linear, tol(hi))
    ranges = _merged(ranges)
    last = ranges[-1]
    return VolumeBreakEven(last.start if last.state == "cheaper" else None, tuple(ranges))


def _segment_ranges(diff: Callable[[float], float], lo: float, hi: float, linear: bool,
                    tol: float) -> list[CostRange]:
    """The ranges of (lo, hi], where both routes keep their replicas: cut at each root of `diff`."""
    inside = lo + min(1.0, (hi - lo) / 2)  # a volume in (lo, hi]
    if linear:
        slope = (diff(hi) - diff(inside)) / (hi - inside) if hi > inside else 0.0
        start, end = diff(inside) - slope * (inside - lo), diff(hi)  # start: the limit from the right at lo
        roots = [lo - start / slope] if start * end < 0 and min(abs(start), abs(end)) > tol else []
    else:
        grid = [inside] + [inside * (hi / inside) ** (i / 47) for i in range(1, 48)] if inside > 0 else [hi]
        roots = [_bisect(diff, a, b) for a, b in zip(grid, grid[1:])
                 if abs(diff(a)) > tol and abs(diff(b)) > tol and diff(a) * diff(b) < 0]
    cuts = [lo, *roots, hi]
    return [CostRange(a, b, _state(diff((a + b) / 2), tol)) for a, b in zip(cuts, cuts[1:])]


def _bisect(f: Callable[[float], float], a: float, b: float) -> float:
    fa = f(a)
    for _ in range(100):
        mid = (a + b) / 2
        if (f(mid) < 0) == (fa < 0):
            a, fa = mid, f(mid)
        else:
            b = mid
    return (a + b) / 2


def _state(difference: float, tol: float) -> State:
    return "cheaper" if difference < -tol else "dearer" if difference > tol else "tied"


def _merged(ranges: list[CostRange]) -> list[CostRange]:
    out: list[CostRange] = []
    for r in ranges:
        if out and out[-1].state == r.state:
            out[-1] = CostRange(out[-1].start, r.end, r.state)
        else:
            out.append(r)
    return out


def payback_months(baseline: Route, candidate: Route, monthly_calls: float, max_months: float = 1200.0) -> float:
    """Months from which the candidate's cumulative cost stays at or below the baseline's, at this volume.

    cumulative(t) = one_off_usd + retraining_usd x (retrainings at e, 2e, ... <= t) + t x running.monthly(V).
    A retraining can make the candidate dearer again after a first crossing; the answer is the end of its
    last dearer stretch. 0 where it is never dearer; inf where it never stays cheaper (or only after
    `max_months`).
    """
    slope = candidate.running.monthly(monthly_calls) - baseline.running.monthly(monthly_calls)
    gap = candidate.one_off_usd - baseline.one_off_usd
    periodic = [(r.retrain_every_months, sign * r.retraining_usd) for sign, r in ((1, candidate), (-1, baseline))
                if r.retrain_every_months and r.retraining_usd]
    drift = slope + sum(amount / every for every, amount in periodic)  # the long-run change a month
    tol = TOLERANCE * (1.0 + abs(gap) + sum(abs(a) for _, a in periodic) + abs(slope))
    if drift > tol:
        return math.inf
    longest = max((every for every, _ in periodic), default=1.0)
    if drift < -tol:  # cumulative difference <= gap + baseline's retraining + drift x t
        end = (max(gap, 0.0) - sum(min(a, 0.0) for _, a in periodic)) / -drift + 2 * longest
    else:
        end = 100 * longest
    if periodic and end > max_months:
        return math.inf
    times = sorted({0.0, end, *(k * e for e, _ in periodic for k in range(1, math.ceil(end / e)) if k * e < end)})
    last_dearer = 0.0
    for a, b in zip(times, times[1:]):
        level = gap + slope * a + sum(amount * math.floor(a / e + 1e-12) for e, amount in periodic)
        if level + slope * (b - a) > tol:
            last_dearer = b  # dearer until the segment's end
        elif level > tol:
            last_dearer = a + level / -slope  # dearer until it falls to the baseline inside the segment
    if last_dearer > 0 and drift >= -tol:  # no long-run saving: a dearer stretch comes back
        return math.inf
    return last_dearer


def curve_volumes(configured: float, break_evens: Iterable[float | None], routes: Iterable[Route],
                  points_per_decade: int = 20, span: float = 10.0) -> list[float]:
    """Monthly volumes for the cost chart: a log grid from min(configured, break-evens) / span to their max x
    span, plus those volumes themselves and every replica step in range, each also just after it (x (1 + 1e-9)),
    so the chart's steps are exact. A break-even of 0 or None is not a volume on a log axis."""
    anchors = [configured, *(b for b in break_evens if b)]
    lo, hi = min(anchors) / span, max(anchors) * span
    decades = math.log10(hi / lo)
    n = max(2, math.ceil(decades * points_per_decade) + 1)
    grid = {lo * (hi / lo) ** (i / (n - 1)) for i in range(n)} | set(anchors)
    for route in routes:
        grid |= {v * f for v in route.running.steps(hi) if lo <= v <= hi for f in (1.0, 1.0 + 1e-9)}
    return sorted(v for v in grid if lo <= v <= hi)


def cost_curves(routes: Mapping[str, Route], volumes: Iterable[float], horizon_months: float) -> list[dict]:
    """The rows of cost_curves.json: at each monthly volume, each route's running cost a month and its total
    over the horizon (fixed costs included), from the same functions as the logged figures."""
    return [{"monthly_calls": v,
             "monthly_usd": {name: route.running.monthly(v) for name, route in routes.items()},
             "horizon_usd": {name: horizon_cost(route, v, horizon_months) for name, route in routes.items()}}
            for v in volumes]


Verdict = Literal["fine-tune", "keep prompting", "too close to call", "not measurable"]


def verdict(accuracy_p_value: float | None, accuracy_diff: float | None, tco_baseline: float, tco_candidate: float,
            alpha: float = 0.05, cost_tie: float = 0.05, metric: str = "accuracy") -> tuple[Verdict, str]:
    """The decision and a one-sentence reason, from the paired test of the primary `metric` (candidate minus
    baseline) and the horizon totals (quality-adjusted where an error cost is set: the caller passes whichever
    apply).

    - not measurable: a p-value, difference or total that is missing or not finite;
    - better / worse: p < alpha and the difference is positive / negative; otherwise the same quality;
    - cheaper / dearer: the candidate's total below / above the baseline's by more than `cost_tie` of the
      baseline's; otherwise the same cost;
    - fine-tune: cheaper and not worse, or better at the same cost; keep prompting: dearer and not better, or
      worse at the same cost; too close to call: the same on both, or one better and the other cheaper.
    """
    numbers = (accuracy_p_value, accuracy_diff, tco_baseline, tco_candidate)
    if any(x is None or not math.isfinite(x) for x in numbers):
        return "not measurable", f"The {metric} test or a route's cost could not be measured."
    better = accuracy_p_value < alpha and accuracy_diff > 0
    worse = accuracy_p_value < alpha and accuracy_diff < 0
    margin = cost_tie * abs(tco_baseline)
    cheaper, dearer = tco_candidate < tco_baseline - margin, tco_candidate > tco_baseline + margin
    costs = f"${tco_candidate:,.2f} against ${tco_baseline:,.2f} over the horizon"
    if metric == "accuracy":
        gap = f"is {'more' if better else 'less'} accurate by {abs(accuracy_diff) * 100:.1f} points"
    else:
        gap = f"scores {abs(accuracy_diff) * 100:.1f} points {'higher' if better else 'lower'} on {metric}"
    quality = (f"{gap} (p = {accuracy_p_value:.3g})" if better or worse
               else f"shows no measurable {metric} difference (p = {accuracy_p_value:.3g})")
    if (cheaper and not worse) or (better and not dearer):
        return "fine-tune", f"The fine-tune {quality} and costs {costs}."
    if (dearer and not better) or (worse and not cheaper):
        return "keep prompting", f"The fine-tune {quality} and costs {costs}."
    if better or worse:
        return "too close to call", (f"The fine-tune {quality} but costs {costs}: set an error cost to weigh "
                                     "one against the other.")
    return "too close to call", f"The fine-tune {quality} and costs {costs}, within {cost_tie:.0%}."
