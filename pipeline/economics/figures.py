"""From measurements to money: each arm's cost model (its price and measured throughput), the figures a
decision needs (monthly cost, cost per 1,000 calls, both break-evens, their quality-adjusted forms), their
intervals over resampled test rows, McNemar's test between arms, and the break-evens' sensitivity.

The math itself is in `costing` and `stats`; this module only feeds it what was measured. Pure: it takes
prices, metrics and rows, never a file, a run or a config file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Union

import numpy as np

from pipeline.economics.costing import (ArmCost, Deployment, cached_call_cost, finetune_fixed_cost, monthly_break_even,
                                       one_off_break_even, quality_adjusted_per_call, ratio, sensitivity)
from pipeline.economics.prices import PerHourPrice, PerTokenPrice, PricingConfig, StatsConfig
from pipeline.economics.stats import bootstrap_intervals, macro_f1_present, mcnemar_exact

Price = Union[PerTokenPrice, PerHourPrice]

# How far past the configured volume the monthly break-even is searched.
SEARCH_VOLUME_X = 1000


@dataclass
class ArmRows:
    """One arm's outcome on each test row, in row order (read back from its predictions.jsonl)."""

    correct: np.ndarray
    predicted: np.ndarray  # label index, -1 when invalid
    gold: np.ndarray
    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    answered: np.ndarray | None = None  # False where the call failed: its tokens are no measurement

    @classmethod
    def from_predictions(cls, rows: list[dict], labels: list[str]) -> "ArmRows":
        """From the rows of a `predictions.jsonl` (label names, as written) and the task's label order."""
        index = {label: i for i, label in enumerate(labels)}
        return cls(np.array([bool(r["correct"]) for r in rows]),
                   np.array([index.get(r["parsed_label"], -1) for r in rows]),
                   np.array([index[r["gold"]] for r in rows]),
                   np.array([float(r["prompt_tokens"]) for r in rows]),
                   np.array([float(r["completion_tokens"]) for r in rows]),
                   np.array(["error" not in r for r in rows]))

    def token_means(self, idx: np.ndarray) -> tuple[float, float]:
        """Mean prompt and completion tokens of the rows `idx` whose call was answered (NaN where none was)."""
        ok = idx if self.answered is None else idx[self.answered[idx]]
        if not len(ok):
            return math.nan, math.nan
        return float(self.prompt_tokens[ok].mean()), float(self.completion_tokens[ok].mean())


def arm_cost(price: Price, metrics: dict[str, float], pricing: PricingConfig,
             prompt_tokens: float | None = None, completion_tokens: float | None = None) -> ArmCost:
    """The arm's cost model: an API's per-call price from its measured tokens (the provider's caching rule
    applied to the prompt's static prefix, whatever the local prefix cache did), or a deployment of
    replicas at the measured throughput; plus its one-off cost."""
    fixed = metrics.get("fixed_cost_usd", 0.0)
    if isinstance(price, PerTokenPrice):
        per_call = cached_call_cost(metrics["prompt_tokens_mean"] if prompt_tokens is None else prompt_tokens,
                                    metrics["completion_tokens_mean"] if completion_tokens is None else completion_tokens,
                                    price, metrics.get("prefix_tokens", 0.0))
        return ArmCost(per_call_usd=per_call, fixed_usd=fixed, hours_per_month=pricing.hours_per_month)
    return ArmCost(deployment=Deployment(price.usd_per_hour, price.min_replicas, price.target_utilisation),
                   throughput_calls_per_s=metrics["throughput_calls_per_s"], fixed_usd=fixed,
                   hours_per_month=pricing.hours_per_month)


def arm_figures(price: Price, metrics: dict[str, float], pricing: PricingConfig) -> dict[str, float]:
    """What the arm costs at the configured monthly volume, and what each lever would change."""
    volume, cost = pricing.monthly_calls, arm_cost(price, metrics, pricing)
    per_call = cost.per_call(volume)
    figures = {"cost_per_call_usd": per_call, "cost_per_1k_calls_usd": 1000 * per_call,
               "monthly_cost_usd": cost.monthly(volume)}
    if cost.deployment is not None:
        figures["replicas"] = float(cost.replicas(volume))
    if pricing.error_cost_usd:
        figures["quality_adjusted_cost_per_call_usd"] = quality_adjusted_per_call(
            per_call, metrics["accuracy"], pricing.error_cost_usd)
    figures.update(lever_figures(price, metrics, pricing))
    return figures


def lever_figures(price: Price, metrics: dict[str, float], pricing: PricingConfig) -> dict[str, float]:
    """Cost per 1,000 calls with a lever pulled the other way: no prompt caching or the provider's batch API
    (API arms), or every call served at batch 1 (self-hosted arms measured at batch 1 too)."""
    volume, out = pricing.monthly_calls, {}
    if isinstance(price, PerTokenPrice):
        tokens = (metrics["prompt_tokens_mean"], metrics["completion_tokens_mean"])
        if price.cached_input_usd_per_mtok is not None:
            uncached = price.model_copy(update={"cached_input_usd_per_mtok": None})
            out["cost_per_1k_calls_usd_no_cache"] = 1000 * cached_call_cost(*tokens, uncached, 0.0)
        if price.batch_input_usd_per_mtok is not None and price.batch_output_usd_per_mtok is not None:
            out["cost_per_1k_calls_usd_batch_api"] = 1000 * cached_call_cost(
                *tokens, price, metrics.get("prefix_tokens", 0.0), batch=True)
    elif metrics.get("throughput_calls_per_s_batch1"):
        at_batch1 = arm_cost(price, {**metrics, "throughput_calls_per_s": metrics["throughput_calls_per_s_batch1"]},
                             pricing)
        out["cost_per_1k_calls_usd_batch1"] = 1000 * at_batch1.per_call(volume)
    return out


def arm_intervals(rows: ArmRows, price: Price, metrics: dict[str, float], pricing: PricingConfig,
                  stats: StatsConfig) -> dict[str, float]:
    """`<metric>_ci_low` / `_ci_high` of accuracy, macro-F1, mean prompt tokens and cost per call over
    resampled test rows. Every arm draws the same resamples (same seed, same row count): paired."""

    def statistic(idx: np.ndarray) -> dict[str, float]:
        prompt, completion = rows.token_means(idx)
        cost = arm_cost(price, metrics, pricing, prompt, completion).per_call(pricing.monthly_calls)
        return {"accuracy": rows.correct[idx].mean(), "macro_f1": macro_f1_present(rows.predicted[idx], rows.gold[idx]),
                "prompt_tokens_mean": prompt, "cost_per_call_usd": cost}

    intervals = bootstrap_intervals(len(rows.correct), statistic, stats.resamples, stats.seed, stats.confidence)
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

    def costs(self, pricing: PricingConfig, factors: dict[str, float] | None = None,
              base_tokens: tuple[float, float] | None = None, cand_tokens: tuple[float, float] | None = None,
              quality: tuple[float, float] | None = None) -> tuple[ArmCost, ArmCost]:
        """Both arms' cost models, with inputs scaled by `factors` (sensitivity), resampled token means,
        and each wrong answer priced at `pricing.error_cost_usd` when `quality` gives the accuracies."""
        f = factors or {}
        base = arm_cost(self.base_price, self.base_metrics, pricing, *(base_tokens or (None, None)))
        cand = arm_cost(self.cand_price, self.cand_metrics, pricing, *(cand_tokens or (None, None)))
        base = base.scaled(per_call_usd=f.get("baseline price", 1.0), usd_per_hour=f.get("baseline price", 1.0),
                           throughput=f.get("baseline throughput", 1.0))
        cand = cand.scaled(per_call_usd=f.get("candidate price", 1.0), usd_per_hour=f.get("candidate price", 1.0),
                           throughput=f.get("candidate throughput", 1.0),
                           fixed_usd=f.get("fine-tune one-off cost", 1.0))
        if quality is not None:
            base = _with_errors(base, quality[0], pricing.error_cost_usd)
            cand = _with_errors(cand, quality[1], pricing.error_cost_usd)
        return base, cand


def _with_errors(cost: ArmCost, accuracy: float, error_cost_usd: float) -> ArmCost:
    return ArmCost(cost.per_call_usd + (1 - accuracy) * error_cost_usd, cost.deployment,
                   cost.throughput_calls_per_s, cost.fixed_usd, cost.hours_per_month)


@lru_cache(maxsize=4096)  # resamples of self-hosted pairs repeat the same costs: solve each once
def break_evens(base: ArmCost, cand: ArmCost, volume: float) -> tuple[float, float]:
    """(one-off break-even calls, monthly break-even volume); inf where there is none."""
    one_off = one_off_break_even(base, cand, volume)
    monthly = monthly_break_even(base, cand, SEARCH_VOLUME_X * volume)
    return (math.inf if one_off.never else one_off.calls), (math.inf if monthly is None else monthly)


def pair_metrics(pair: Pair, rows: dict[str, ArmRows], pricing: PricingConfig, stats: StatsConfig) -> dict[str, float]:
    """Parent-run figures of the compare pair: both break-evens (and quality-adjusted ones) with intervals,
    payback months, and McNemar's p between the two arms."""
    volume = pricing.monthly_calls
    one_off, monthly = break_evens(*pair.costs(pricing), volume)
    out: dict[str, float] = {"break_even_calls": one_off, "break_even_monthly_calls": monthly,
                             "payback_months": one_off / volume}
    if pricing.error_cost_usd:
        quality = (pair.base_metrics["accuracy"], pair.cand_metrics["accuracy"])
        q_one_off, q_monthly = break_evens(*pair.costs(pricing, quality=quality), volume)
        out.update({"quality_adjusted_break_even_calls": q_one_off,
                    "quality_adjusted_break_even_monthly_calls": q_monthly})
    base_rows, cand_rows = rows[pair.baseline], rows[pair.candidate]
    out["mcnemar_p"] = mcnemar_exact(base_rows.correct, cand_rows.correct)

    def statistic(idx: np.ndarray) -> dict[str, float]:
        costs = pair.costs(pricing, base_tokens=base_rows.token_means(idx), cand_tokens=cand_rows.token_means(idx))
        calls, monthly_calls = break_evens(*costs, volume)
        return {"break_even_calls": calls, "break_even_monthly_calls": monthly_calls}

    out.update(_flatten_intervals(bootstrap_intervals(len(base_rows.correct), statistic, stats.resamples,
                                                      stats.seed, stats.confidence)))
    return out


SENSITIVITY_FACTORS = ("baseline price", "candidate price", "baseline throughput", "candidate throughput",
                       "fine-tune one-off cost")


def break_even_sensitivity(pair: Pair, pricing: PricingConfig, spread: float = 0.5) -> list[dict[str, Any]]:
    """Both break-evens with each input alone at -50% and +50%: the rows of the tornado chart."""
    rows = []
    for figure, position in (("break_even_calls", 0), ("break_even_monthly_calls", 1)):
        def evaluate(factors: dict[str, float]) -> float:
            return break_evens(*pair.costs(pricing, factors), pricing.monthly_calls)[position]

        for name, low, high in sensitivity(evaluate, list(SENSITIVITY_FACTORS), spread):
            rows.append({"figure": figure, "factor": name, "low": low, "high": high})
    return rows


def prompt_pair_metrics(rows: dict[str, ArmRows], baseline: str | None, naive: str | None) -> dict[str, float]:
    """McNemar's p between the engineered and the naive prompt: is the prompt engineering gain real?"""
    if not baseline or not naive or baseline == naive or baseline not in rows or naive not in rows:
        return {}
    return {"mcnemar_p_prompt": mcnemar_exact(rows[baseline].correct, rows[naive].correct)}


def token_reduction(base: dict[str, float], cand: dict[str, float]) -> float:
    return ratio(base["prompt_tokens_mean"], cand["prompt_tokens_mean"])


def fixed_cost(kind: str, given_usd: float | None, pricing: PricingConfig, metrics: dict[str, float],
               n_train: int) -> float:
    """One-off cost of an arm's route: given, or for a fine-tune its measured training (time on priced
    hardware, or tokens at a provider's training price) and labelling."""
    if given_usd is not None:
        return given_usd
    if kind != "finetuned":
        return pricing.prompt_fixed_usd
    rates = pricing.finetune
    labelling = n_train * rates.labelling_usd_per_example
    if rates.training_usd_per_mtok is not None:
        return metrics.get("train_tokens", 0.0) * rates.training_usd_per_mtok / 1e6 + labelling
    return finetune_fixed_cost(metrics.get("train_time_s", 0.0), rates.usd_per_hour, n_train,
                               rates.labelling_usd_per_example)


def roi_metrics(baseline: str | None, candidate: str | None, naive: str | None, arms: dict[str, dict[str, float]],
                prices: dict[str, Price], rows: dict[str, ArmRows], pricing: PricingConfig,
                stats: StatsConfig) -> tuple[dict[str, float], list[dict]]:
    """Parent-run metrics for the compare pair (fixed cost, both break-evens with intervals, payback,
    McNemar's p, token reduction, prompt gain) and the break-evens' sensitivity rows."""
    out: dict[str, float] = {}
    if baseline and naive and baseline != naive:
        out["prompt_gain_pts"] = 100 * (arms[baseline]["accuracy"] - arms[naive]["accuracy"])
        out.update(prompt_pair_metrics(rows, baseline, naive))
    if not candidate:
        return out, []
    out["finetune_fixed_cost_usd"] = arms[candidate]["fixed_cost_usd"]
    if not baseline:
        return out, []
    pair = Pair(baseline, candidate, prices[baseline], prices[candidate], arms[baseline], arms[candidate])
    out["token_reduction_x"] = token_reduction(arms[baseline], arms[candidate])
    out.update(pair_metrics(pair, rows, pricing, stats))
    return out, break_even_sensitivity(pair, pricing)
