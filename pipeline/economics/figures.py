"""From measurements to money, per arm and for the one-off break-even: each arm's cost at the configured volume
(as deployed, `routes`), its levers, intervals over resampled test rows, the paired test between arms
(McNemar's, or a permutation test for a continuous metric), and the
one-off break-even with its sensitivity. The horizon figures and the verdict are `decision`'s.

The math itself is in `costing`, `serving`, `routes` and `stats`; this module only feeds it what was measured. Pure: it takes
prices, metrics and rows, never a file, a run or a config file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np

from pipeline.economics.costing import ArmCost, one_off_break_even, quality_adjusted_per_call, ratio, sensitivity
from pipeline.economics.prices import PerTokenPrice, PricingConfig, StatsConfig
from pipeline.economics.routes import ApiUsage, Price, running_cost, scaled
from pipeline.economics.serving import AlwaysOn
from pipeline.economics.stats import (bootstrap_intervals, macro_f1_present, mcnemar_exact, micro_f1,
                                      paired_permutation_p)


@dataclass
class ArmRows:
    """One arm's outcome on each test row, in row order (read back from its predictions.jsonl).

    `score` is each row's share of the primary metric (1/0 correct for accuracy, the row's chrF); where `counts`
    holds each row's (true positive, false positive, false negative) field/value pairs, the primary is the micro
    F1 over them instead of the mean score. `binary`: every score is 0 or 1 by construction (McNemar's test)."""

    score: np.ndarray
    predicted: np.ndarray | None  # classification: label index, -1 when invalid
    gold: np.ndarray | None
    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    answered: np.ndarray | None = None  # False where the call failed: its tokens are no measurement
    counts: np.ndarray | None = None  # [rows, 3]
    binary: bool = True

    @classmethod
    def from_predictions(cls, rows: list[dict], labels: list[str]) -> "ArmRows":
        """From the rows of a `predictions.jsonl` (label names, as written) and the task's label order. A
        classification row records `correct`; other task types a `score` (and extraction its pair counts)."""
        tokens = (np.array([float(r["prompt_tokens"]) for r in rows]),
                  np.array([float(r["completion_tokens"]) for r in rows]), np.array(["error" not in r for r in rows]))
        if rows and "score" in rows[0]:
            counts = np.array([[r["tp"], r["fp"], r["fn"]] for r in rows], dtype=float) if "tp" in rows[0] else None
            return cls(np.array([float(r["score"]) for r in rows]), None, None, *tokens, counts=counts, binary=False)
        index = {label: i for i, label in enumerate(labels)}
        return cls(np.array([float(bool(r["correct"])) for r in rows]),
                   np.array([index.get(r["parsed_label"], -1) for r in rows]),
                   np.array([index[r["gold"]] for r in rows]), *tokens)

    def __len__(self) -> int:
        return len(self.score)

    def primary(self, idx: np.ndarray | None = None) -> float:
        """The primary metric over the rows `idx` (all by default): micro F1 of the pair counts, or the mean score."""
        idx = np.arange(len(self)) if idx is None else idx
        return float(micro_f1(self.counts[idx]) if self.counts is not None else self.score[idx].mean())

    def head(self, n: int) -> "ArmRows":
        """The outcomes on the first `n` rows."""
        return replace(self, **{name: None if a is None else a[:n] for name, a in
                                (("score", self.score), ("predicted", self.predicted), ("gold", self.gold),
                                 ("prompt_tokens", self.prompt_tokens), ("completion_tokens", self.completion_tokens),
                                 ("answered", self.answered), ("counts", self.counts))})

    def token_means(self, idx: np.ndarray) -> tuple[float, float]:
        """Mean prompt and completion tokens of the rows `idx` whose call was answered (NaN where none was)."""
        ok = idx if self.answered is None else idx[self.answered[idx]]
        if not len(ok):
            return math.nan, math.nan
        return float(self.prompt_tokens[ok].mean()), float(self.completion_tokens[ok].mean())


def paired_rows(rows: dict[str, ArmRows], a: str, b: str) -> tuple[ArmRows, ArmRows]:
    """Two arms' outcomes on the rows both were scored on: arms evaluated sequentially take the test rows in
    one order and may stop at different rows, so the rows they share are the shorter one's."""
    n = min(len(rows[a]), len(rows[b]))
    return rows[a].head(n), rows[b].head(n)


def paired_test(a: ArmRows, b: ArmRows, stats: StatsConfig | None = None) -> tuple[str, float]:
    """The paired test of the two arms' primary metric on the same rows, as (metric name, p): McNemar's exact
    test where both score 0/1 a row, else a paired permutation test of the difference."""
    if a.binary and b.binary:
        return "mcnemar_p", mcnemar_exact(a.score, b.score)
    stats = stats or StatsConfig()
    if a.counts is not None:
        return "permutation_p", paired_permutation_p(a.counts, b.counts, micro_f1, stats.resamples, stats.seed)
    return "permutation_p", paired_permutation_p(a.score, b.score, lambda s: s.mean(axis=-1), stats.resamples,
                                                 stats.seed)


def arm_cost(price: Price, metrics: dict[str, float], pricing: PricingConfig,
             prompt_tokens: float | None = None, completion_tokens: float | None = None) -> ArmCost:
    """The arm's cost per call at the configured monthly volume, as deployed (`routes.running_cost`: an API as
    billed, replicas sized for the volume's peak), plus its one-off cost."""
    volume = pricing.monthly_calls
    running = running_cost(price, metrics, pricing, prompt_tokens, completion_tokens)
    return ArmCost(per_call_usd=running.monthly(volume) / volume, fixed_usd=metrics.get("fixed_cost_usd", 0.0),
                   hours_per_month=pricing.hours_per_month)


def arm_figures(price: Price, metrics: dict[str, float], pricing: PricingConfig,
                primary: str = "accuracy") -> dict[str, float]:
    """What the arm costs at the configured monthly volume (each wrong answer priced on the `primary` metric's
    shortfall from 1), and what each lever would change."""
    volume = pricing.monthly_calls
    running = running_cost(price, metrics, pricing)
    monthly = running.monthly(volume)
    figures = {"cost_per_call_usd": monthly / volume, "cost_per_1k_calls_usd": 1000 * monthly / volume,
               "monthly_cost_usd": monthly}
    if isinstance(running, AlwaysOn):
        figures["replicas"] = float(running.replicas(volume))
    if isinstance(running, ApiUsage):
        figures["cache_hit_rate"] = running.hit_rate(volume)
    if pricing.error_cost_usd:
        figures["quality_adjusted_cost_per_call_usd"] = quality_adjusted_per_call(
            monthly / volume, metrics[primary], pricing.error_cost_usd)
    figures.update(lever_figures(price, metrics, pricing))
    return figures


def lever_figures(price: Price, metrics: dict[str, float], pricing: PricingConfig) -> dict[str, float]:
    """Cost per 1,000 calls with a lever pulled the other way: no prompt caching or the provider's batch API
    (API arms), or every call served at batch 1 (self-hosted arms measured at batch 1 too)."""
    volume, out = pricing.monthly_calls, {}
    if isinstance(price, PerTokenPrice):
        usage = running_cost(price, metrics, pricing)
        if price.cached_input_usd_per_mtok is not None:
            uncached = replace(usage, price=price.model_copy(update={"cached_input_usd_per_mtok": None}))
            out["cost_per_1k_calls_usd_no_cache"] = 1000 * uncached.per_call(volume)
        if price.batch_input_usd_per_mtok is not None and price.batch_output_usd_per_mtok is not None:
            out["cost_per_1k_calls_usd_batch_api"] = 1000 * replace(usage, batch=True).per_call(volume)
    elif metrics.get("throughput_calls_per_s_batch1"):
        at_batch1 = {**metrics, "throughput_calls_per_s": metrics["throughput_calls_per_s_batch1"], "batch_size": 1}
        out["cost_per_1k_calls_usd_batch1"] = 1000 * arm_cost(price, at_batch1, pricing).per_call(volume)
    return out


def arm_intervals(rows: ArmRows, price: Price, metrics: dict[str, float], pricing: PricingConfig,
                  stats: StatsConfig, primary: str = "accuracy") -> dict[str, float]:
    """`<metric>_ci_low` / `_ci_high` of the primary metric (and macro-F1 for a classification), mean prompt
    tokens and cost per call over resampled test rows. Every arm draws the same resamples (same seed, same row
    count): paired."""

    def statistic(idx: np.ndarray) -> dict[str, float]:
        prompt, completion = rows.token_means(idx)
        cost = arm_cost(price, metrics, pricing, prompt, completion).per_call(pricing.monthly_calls)
        out = {primary: rows.primary(idx), "prompt_tokens_mean": prompt, "cost_per_call_usd": cost}
        if rows.predicted is not None:
            out["macro_f1"] = macro_f1_present(rows.predicted[idx], rows.gold[idx])
        return out

    intervals = bootstrap_intervals(len(rows), statistic, stats.resamples, stats.seed, stats.confidence)
    return _flatten_intervals(intervals)


def _flatten_intervals(intervals: dict[str, tuple[float, float]]) -> dict[str, float]:
    out = {}
    for name, (low, high) in intervals.items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
    return out


@dataclass
class Pair:
    """The compare pair's measured inputs, as the break-evens need them."""

    baseline: str
    candidate: str
    base_price: Price
    cand_price: Price
    base_metrics: dict[str, float]
    cand_metrics: dict[str, float]
    primary: str = "accuracy"  # the quality metric a wrong answer's cost is priced on

    def costs(self, pricing: PricingConfig, factors: dict[str, float] | None = None,
              base_tokens: tuple[float, float] | None = None, cand_tokens: tuple[float, float] | None = None,
              quality: tuple[float, float] | None = None) -> tuple[ArmCost, ArmCost]:
        """Both arms' cost models, with inputs scaled by `factors` (sensitivity), resampled token means,
        and each wrong answer priced at `pricing.error_cost_usd` when `quality` gives the accuracies."""
        f = factors or {}
        base = arm_cost(*scaled(self.base_price, self.base_metrics, f.get("baseline price", 1.0),
                                f.get("baseline throughput", 1.0)), pricing, *(base_tokens or (None, None)))
        cand = arm_cost(*scaled(self.cand_price, self.cand_metrics, f.get("candidate price", 1.0),
                                f.get("candidate throughput", 1.0)), pricing, *(cand_tokens or (None, None)))
        cand = cand.scaled(fixed_usd=f.get("fine-tune one-off cost", 1.0))
        if quality is not None:
            base = _with_errors(base, quality[0], pricing.error_cost_usd)
            cand = _with_errors(cand, quality[1], pricing.error_cost_usd)
        return base, cand


def _with_errors(cost: ArmCost, accuracy: float, error_cost_usd: float) -> ArmCost:
    return ArmCost(cost.per_call_usd + (1 - accuracy) * error_cost_usd, cost.deployment,
                   cost.throughput_calls_per_s, cost.fixed_usd, cost.hours_per_month)


@lru_cache(maxsize=4096)  # resamples of self-hosted pairs repeat the same costs: solve each once
def one_off_calls(base: ArmCost, cand: ArmCost, volume: float) -> float:
    """Calls at this volume until the candidate's extra one-off cost is paid back by its saving a call; inf
    where it never is."""
    one_off = one_off_break_even(base, cand, volume)
    return math.inf if one_off.never else one_off.calls


def pair_metrics(pair: Pair, rows: dict[str, ArmRows], pricing: PricingConfig, stats: StatsConfig) -> dict[str, float]:
    """Parent-run figures of the compare pair at the configured volume: the one-off break-even (calls until the
    fine-tune's extra one-off cost is paid back by its saving per call; and quality-adjusted) with its interval,
    and the paired test's p between the two arms. The horizon figures are `economics.decision`'s."""
    volume = pricing.monthly_calls
    one_off = one_off_calls(*pair.costs(pricing), volume)
    out: dict[str, float] = {"break_even_calls": one_off}
    if pricing.error_cost_usd:
        quality = (pair.base_metrics[pair.primary], pair.cand_metrics[pair.primary])
        out["quality_adjusted_break_even_calls"] = one_off_calls(*pair.costs(pricing, quality=quality), volume)
    base_rows, cand_rows = paired_rows(rows, pair.baseline, pair.candidate)
    name, p = paired_test(base_rows, cand_rows, stats)
    out[name] = p

    def statistic(idx: np.ndarray) -> dict[str, float]:
        costs = pair.costs(pricing, base_tokens=base_rows.token_means(idx), cand_tokens=cand_rows.token_means(idx))
        return {"break_even_calls": one_off_calls(*costs, volume)}

    out.update(_flatten_intervals(bootstrap_intervals(len(base_rows), statistic, stats.resamples,
                                                      stats.seed, stats.confidence)))
    return out


SENSITIVITY_FACTORS = ("baseline price", "candidate price", "baseline throughput", "candidate throughput",
                       "fine-tune one-off cost")


def break_even_sensitivity(pair: Pair, pricing: PricingConfig, spread: float = 0.5) -> list[dict[str, Any]]:
    """The one-off break-even with each input alone at -50% and +50%: rows of the tornado chart."""

    def evaluate(factors: dict[str, float]) -> float:
        return one_off_calls(*pair.costs(pricing, factors), pricing.monthly_calls)

    return [{"figure": "break_even_calls", "factor": name, "low": low, "high": high}
            for name, low, high in sensitivity(evaluate, list(SENSITIVITY_FACTORS), spread)]


def prompt_pair_metrics(rows: dict[str, ArmRows], baseline: str | None, naive: str | None,
                        stats: StatsConfig | None = None) -> dict[str, float]:
    """The paired test's p between the engineered and the naive prompt (`mcnemar_p_prompt`, or
    `permutation_p_prompt` for a continuous metric): is the prompt engineering gain real?"""
    if not baseline or not naive or baseline == naive or baseline not in rows or naive not in rows:
        return {}
    name, p = paired_test(*paired_rows(rows, baseline, naive), stats)
    return {f"{name}_prompt": p}


# The paired test's p of the compare pair (whichever applies) and the test's name.
PAIRED_TESTS = {"mcnemar_p": "McNemar", "permutation_p": "paired permutation"}


def paired_p(parent: dict[str, float], suffix: str = "") -> tuple[str | None, float | None]:
    """The paired test's name and p in a parent run's metrics (None, None where neither was logged)."""
    for name in PAIRED_TESTS:
        if name + suffix in parent:
            return name, parent[name + suffix]
    return None, None


def token_reduction(base: dict[str, float], cand: dict[str, float]) -> float:
    return ratio(base["prompt_tokens_mean"], cand["prompt_tokens_mean"])
