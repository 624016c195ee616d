"""The compare pair over the horizon, and the decision: each route's total cost of ownership, the monthly volume
from which the fine-tune costs less (with the cheaper/tied/dearer ranges), payback months, their intervals over
resampled test rows, the quality-adjusted forms, the verdict, the sensitivity of the break-even volume, the cost
curves of every arm and what each prompt would cost on hosted models. Pure: prices, metrics and rows in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from pipeline.economics.figures import (ArmRows, Pair, break_even_sensitivity, pair_metrics, paired_p, paired_rows,
                                        prompt_pair_metrics, token_reduction)
from pipeline.economics.horizon import (Route, VolumeBreakEven, break_even_monthly_calls, cost_curves, curve_volumes,
                                        horizon_cost, payback_months, verdict)
from pipeline.economics.prices import PerTokenPrice, PricingConfig, StatsConfig
from pipeline.economics.routes import ApiUsage, Ownership, Price, route, running_cost, scaled, with_errors
from pipeline.economics.stats import bootstrap_intervals

SEARCH_VOLUME_X = 1000  # how far past the configured volume the break-even volume is searched


@dataclass(frozen=True)
class ArmInputs:
    """One measured arm, as the money math needs it."""

    name: str
    price: Price
    metrics: dict[str, float]
    own: Ownership
    primary: str = "accuracy"  # the quality metric each wrong answer's cost is priced on

    @property
    def quality(self) -> float:
        return self.metrics[self.primary]

    @property
    def kind(self) -> str:
        return "api" if isinstance(self.price, PerTokenPrice) else self.price.billing

    def scaled(self, price: float = 1.0, throughput: float = 1.0) -> "ArmInputs":
        """The same arm with its price or its measured throughput multiplied (sensitivity)."""
        p, m = scaled(self.price, self.metrics, price, throughput)
        return replace(self, price=p, metrics=m)


def arm_route(arm: ArmInputs, pricing: PricingConfig, tokens: tuple[float, float] | None = None,
              accuracy: float | None = None) -> Route:
    """The arm's route (with resampled token means, and each wrong answer priced where `accuracy` is given)."""
    running = running_cost(arm.price, arm.metrics, pricing, *(tokens or (None, None)))
    r = route(arm.price, arm.metrics, pricing, arm.own, running)
    return with_errors(r, accuracy, pricing.error_cost_usd) if accuracy is not None else r


def _pair_figures(b: Route, c: Route, pricing: PricingConfig,
                  prefix: str = "") -> tuple[dict[str, float], VolumeBreakEven]:
    """Both horizon totals, the break-even volume and payback (keys with `prefix`), and the solved crossing
    (its ranges too)."""
    volume, horizon = pricing.monthly_calls, pricing.horizon_months
    crossing = break_even_monthly_calls(b, c, horizon, SEARCH_VOLUME_X * volume)
    return {f"{prefix}tco_baseline_usd": horizon_cost(b, volume, horizon),
            f"{prefix}tco_candidate_usd": horizon_cost(c, volume, horizon),
            f"{prefix}break_even_monthly_calls": math.inf if crossing.calls is None else crossing.calls,
            f"{prefix}payback_months": payback_months(b, c, volume)}, crossing


def horizon_metrics(base: ArmInputs, cand: ArmInputs, rows: dict[str, Any], pricing: PricingConfig,
                    stats: StatsConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Parent-run figures of the pair over `pricing.horizon_months` (with intervals over resampled rows) and the
    cheaper/tied/dearer ranges of the candidate by monthly volume."""
    out, crossing = _pair_figures(arm_route(base, pricing), arm_route(cand, pricing), pricing)
    quality = bool(pricing.error_cost_usd)
    if quality:
        out.update(_pair_figures(arm_route(base, pricing, accuracy=base.quality),
                                 arm_route(cand, pricing, accuracy=cand.quality), pricing,
                                 "quality_adjusted_")[0])
    base_rows, cand_rows = paired_rows(rows, base.name, cand.name)

    def statistic(idx: np.ndarray) -> dict[str, float]:
        bt, ct = base_rows.token_means(idx), cand_rows.token_means(idx)
        figures = _pair_figures(arm_route(base, pricing, bt), arm_route(cand, pricing, ct), pricing)[0]
        if quality:
            figures.update(_pair_figures(arm_route(base, pricing, bt, base_rows.primary(idx)),
                                         arm_route(cand, pricing, ct, cand_rows.primary(idx)),
                                         pricing, "quality_adjusted_")[0])
        return figures

    intervals = bootstrap_intervals(len(base_rows), statistic, stats.resamples, stats.seed, stats.confidence)
    for name, (low, high) in intervals.items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
    return out, [asdict(r) for r in crossing.ranges]


def decide(parent: dict[str, float], base: ArmInputs, cand: ArmInputs, pricing: PricingConfig,
           stats: StatsConfig) -> tuple[str, str]:
    """The verdict and its reason, from the paired test's p, the primary metric's difference and the horizon
    totals (quality-adjusted where an error cost is set)."""
    prefix = "quality_adjusted_" if pricing.error_cost_usd else ""
    decision, reason = verdict(paired_p(parent)[1], cand.quality - base.quality,
                               parent.get(f"{prefix}tco_baseline_usd"), parent.get(f"{prefix}tco_candidate_usd"),
                               alpha=round(1 - stats.confidence, 6), metric=base.primary)
    priced = f"each wrong answer at ${pricing.error_cost_usd:,.2f}, " if prefix else ""
    where = f" ({priced}{pricing.horizon_months:g} months at {pricing.monthly_calls:,.0f} calls/month)"
    return decision, reason.replace(" over the horizon", " over the horizon" + where, 1)


SENSITIVITY = ("baseline price", "candidate price", "baseline throughput", "candidate throughput",
               "fine-tune one-off cost", "people hours", "horizon", "error cost", "baseline error rate",
               "candidate error rate")


def sensitivity_rows(base: ArmInputs, cand: ArmInputs, pricing: PricingConfig,
                     spread: float = 0.5) -> list[dict[str, Any]]:
    """The break-even volume with each input alone at (1 - spread) and (1 + spread) times its value: the rows
    of the tornado chart. Error cost and error rates move the quality-adjusted figure (set where an error cost
    is), the rest the plain one."""
    quality = bool(pricing.error_cost_usd)
    figure = "quality_adjusted_break_even_monthly_calls" if quality else "break_even_monthly_calls"
    rows = []
    for factor in SENSITIVITY if quality else SENSITIVITY[:7]:
        values = [_break_even_with(base, cand, pricing, factor, f, quality) for f in (1 - spread, 1 + spread)]
        rows.append({"figure": figure, "factor": factor, "low": values[0], "high": values[1]})
    return rows


def _break_even_with(base: ArmInputs, cand: ArmInputs, pricing: PricingConfig, factor: str, f: float,
                     quality: bool) -> float:
    b_in = base.scaled(price=f if factor == "baseline price" else 1.0,
                       throughput=f if factor == "baseline throughput" else 1.0)
    c_in = cand.scaled(price=f if factor == "candidate price" else 1.0,
                       throughput=f if factor == "candidate throughput" else 1.0)
    p = pricing
    if factor == "people hours":
        people = p.people
        p = p.model_copy(update={"people": people.model_copy(update={
            "prompt_hours": people.prompt_hours * f, "finetune_hours": people.finetune_hours * f,
            "retrain_hours": people.retrain_hours * f})})
    elif factor == "horizon":
        p = p.model_copy(update={"horizon_months": p.horizon_months * f})
    elif factor == "error cost":
        p = p.model_copy(update={"error_cost_usd": p.error_cost_usd * f})
    b_acc = 1 - (1 - base.quality) * (f if factor == "baseline error rate" else 1.0) if quality else None
    c_acc = 1 - (1 - cand.quality) * (f if factor == "candidate error rate" else 1.0) if quality else None
    b, c = arm_route(b_in, p, accuracy=b_acc), arm_route(c_in, p, accuracy=c_acc)
    if factor == "fine-tune one-off cost":
        c = replace(c, labelling_usd=c.labelling_usd * f, training_usd=c.training_usd * f)
    crossing = break_even_monthly_calls(b, c, p.horizon_months, SEARCH_VOLUME_X * p.monthly_calls)
    return math.inf if crossing.calls is None else crossing.calls


def curves(arms: list[ArmInputs], roles: dict[str, str], parent: dict[str, float],
           pricing: PricingConfig) -> dict[str, Any]:
    """`cost_curves.json`: every measured arm's cost a month and over the horizon at each monthly volume of a log
    grid spanning the configured volume and the break-evens (replica steps exact), quality-adjusted where an
    error cost is set, and the break-even volumes to mark. The same functions as the logged figures."""
    marks = [(key, label) for key, label in (("break_even_monthly_calls", "fine-tune cheaper from"),
                                              ("quality_adjusted_break_even_monthly_calls", "with errors priced"))
             if key in parent]
    routes = {a.name: arm_route(a, pricing) for a in arms}
    volumes = curve_volumes(pricing.monthly_calls, [parent[k] for k, _ in marks if math.isfinite(parent[k])],
                            routes.values())
    rows = cost_curves(routes, volumes, pricing.horizon_months)
    quality_rows = None
    if pricing.error_cost_usd:
        quality = {a.name: arm_route(a, pricing, accuracy=a.quality) for a in arms}
        quality_rows = cost_curves(quality, volumes, pricing.horizon_months)
    out_routes = []
    for a in arms:
        entry = {"name": a.name, "role": roles.get(a.name, ""), "kind": a.kind,
                 "monthly_usd": [r["monthly_usd"][a.name] for r in rows],
                 "horizon_usd": [r["horizon_usd"][a.name] for r in rows]}
        if quality_rows:
            entry["quality_adjusted_monthly_usd"] = [r["monthly_usd"][a.name] for r in quality_rows]
            entry["quality_adjusted_horizon_usd"] = [r["horizon_usd"][a.name] for r in quality_rows]
        out_routes.append(entry)
    return {"configured_volume": pricing.monthly_calls, "horizon_months": pricing.horizon_months,
            "volumes": volumes, "routes": out_routes,
            "break_evens": [{"key": k, "label": label, "volume": parent[k], "panel": "horizon_usd"}
                            for k, label in marks]}


def what_if(prompt_arms: list[ArmInputs], hosted: dict[str, PerTokenPrice], pricing: PricingConfig) -> list[dict]:
    """Each prompt arm's measured tokens priced on each hosted model: cost a month at the configured volume and
    over the horizon (the prompt route's fixed costs included). Cost only: accuracy is not measured there."""
    out = []
    for arm in prompt_arms:
        m = arm.metrics
        for model, price in hosted.items():
            usage = ApiUsage(price, m["prompt_tokens_mean"], m["completion_tokens_mean"], m.get("prefix_tokens", 0.0),
                             hours_per_month=pricing.hours_per_month)
            r = route(price, m, pricing, arm.own, usage)
            out.append({"arm": arm.name, "model": model, "monthly_usd": usage.monthly(pricing.monthly_calls),
                        "horizon_usd": horizon_cost(r, pricing.monthly_calls, pricing.horizon_months),
                        "price_date": price.date})
    return out


@dataclass
class Decision:
    """Everything the run logs and the report shows about the comparison."""

    parent: dict[str, float]
    sensitivity: list[dict[str, Any]]
    ranges: list[dict[str, Any]]
    verdict: tuple[str, str] | None
    curves: dict[str, Any]
    what_if: list[dict[str, Any]]


def compare(baseline: str | None, candidate: str | None, naive: str | None, arms: dict[str, ArmInputs],
            rows: dict[str, ArmRows], pricing: PricingConfig, stats: StatsConfig,
            hosted: dict[str, PerTokenPrice]) -> Decision:
    """The parent run's figures (prompt gain, fixed cost, token reduction, the one-off break-even, the paired test's p,
    each route's horizon total, the break-even volume, payback months, with intervals), the sensitivity rows,
    the cost ranges, the verdict, the cost curves and the what-if table. Arms not measured are not in `arms`."""
    out: dict[str, float] = {}
    metrics = {name: a.metrics for name, a in arms.items()}
    if baseline and naive and baseline != naive:
        out["prompt_gain_pts"] = 100 * (arms[baseline].quality - arms[naive].quality)
        out.update(prompt_pair_metrics(rows, baseline, naive, stats))
    sensitivity: list[dict[str, Any]] = []
    ranges: list[dict[str, Any]] = []
    decided = None
    if candidate:
        out["finetune_fixed_cost_usd"] = metrics[candidate]["fixed_cost_usd"]
    if baseline and candidate:
        base, cand = arms[baseline], arms[candidate]
        pair = Pair(baseline, candidate, base.price, cand.price, base.metrics, cand.metrics, base.primary)
        out["token_reduction_x"] = token_reduction(base.metrics, cand.metrics)
        out.update(pair_metrics(pair, rows, pricing, stats))
        horizon, ranges = horizon_metrics(base, cand, rows, pricing, stats)
        out.update(horizon)
        sensitivity = break_even_sensitivity(pair, pricing) + sensitivity_rows(base, cand, pricing)
        decided = decide(out, base, cand, pricing, stats)
    roles = {n: r for n, r in ((baseline, "baseline"), (candidate, "candidate")) if n}
    prompt_arms = [a for a in arms.values() if a.own.kind == "prompt"]
    return Decision(out, sensitivity, ranges, decided, curves(list(arms.values()), roles, out, pricing),
                    what_if(prompt_arms, hosted, pricing))
