"""Each arm as a route a team would own: its running cost as deployed (an API as billed, replicas always on or
billed per second) and its fixed costs (people, labels, training and its search runs, evaluation, retraining).
Pure: built from an arm's price, its measured metrics and the `pricing` section; `horizon` and `serving` hold
the math.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

from pipeline.economics.costing import HOURS_PER_MONTH, SECONDS_PER_HOUR
from pipeline.economics.horizon import Route, RunningCost
from pipeline.economics.prices import PerHourPrice, PerTokenPrice, PricingConfig
from pipeline.economics.serving import (AlwaysOn, PerSecond, ThroughputPoint, billed_call_cost, cache_hit_rate,
                                        provider_rule)

Price = Union[PerTokenPrice, PerHourPrice]


@dataclass(frozen=True)
class ApiUsage:
    """An API billed by its tokens: monthly(V) = V x the call's billed cost, with the prefix-cache hit rate that
    V calls a month find (a set `cache_hit_rate` wins; the server's reported cached tokens win over both)."""

    price: PerTokenPrice
    prompt_tokens: float
    completion_tokens: float
    prefix_tokens: float
    cached_tokens: float | None = None  # mean a call, as the server reported them; None: it reported none
    hours_per_month: float = HOURS_PER_MONTH
    batch: bool = False

    @property
    def linear(self) -> bool:
        return self.hit_rate_fixed

    @property
    def hit_rate_fixed(self) -> bool:
        return (self.price.cache_hit_rate is not None or self.price.cached_input_usd_per_mtok is None
                or self.cached_tokens is not None)

    def hit_rate(self, monthly_calls: float) -> float:
        if self.price.cache_hit_rate is not None:
            return self.price.cache_hit_rate
        rule = provider_rule(self.price.provider)
        return cache_hit_rate(monthly_calls, rule.cache_ttl_s, self.hours_per_month)

    def per_call(self, monthly_calls: float) -> float:
        return billed_call_cost(self.prompt_tokens, self.completion_tokens, self.prefix_tokens, self.price,
                                provider_rule(self.price.provider), self.hit_rate(monthly_calls), self.batch,
                                self.cached_tokens)

    def monthly(self, monthly_calls: float) -> float:
        return monthly_calls * self.per_call(monthly_calls)

    def steps(self, max_calls: float) -> list[float]:
        return []


@dataclass(frozen=True)
class WithErrors:
    """A running cost plus each wrong answer priced: monthly(V) + V x (1 - accuracy) x error_cost_usd."""

    running: RunningCost
    error_usd_per_call: float

    @property
    def linear(self) -> bool:
        return self.running.linear

    def monthly(self, monthly_calls: float) -> float:
        return self.running.monthly(monthly_calls) + monthly_calls * self.error_usd_per_call

    def steps(self, max_calls: float) -> list[float]:
        return self.running.steps(max_calls)


def throughput_points(metrics: dict[str, float]) -> tuple[ThroughputPoint, ...]:
    """The measured passes a deployment can run: the batched pass (at `batch_size`, the arm's eval batch), and
    the batch-1 sample where there is one."""
    batch_size = int(metrics.get("batch_size", 1))
    batched = ThroughputPoint(batch_size, metrics["throughput_calls_per_s"],
                              metrics.get("latency_p95_ms_batched", metrics["latency_p95_ms"]))
    if "throughput_calls_per_s_batch1" not in metrics or batch_size <= 1:
        return (batched,)
    return (ThroughputPoint(1, metrics["throughput_calls_per_s_batch1"], metrics["latency_p95_ms"]), batched)


def running_cost(price: Price, metrics: dict[str, float], pricing: PricingConfig,
                 prompt_tokens: float | None = None, completion_tokens: float | None = None) -> RunningCost:
    """The arm's cost a month at any volume, as deployed."""
    if isinstance(price, PerTokenPrice):
        reported = metrics.get("cached_tokens_mean")
        return ApiUsage(price, metrics["prompt_tokens_mean"] if prompt_tokens is None else prompt_tokens,
                        metrics["completion_tokens_mean"] if completion_tokens is None else completion_tokens,
                        metrics.get("prefix_tokens", 0.0), reported if reported else None, pricing.hours_per_month)
    points = throughput_points(metrics)
    if price.billing == "per_second":
        return PerSecond(price.usd_per_hour, points, pricing.latency_target_ms, price.premium, price.cold_start_s,
                         price.idle_timeout_s, price.min_replicas, pricing.hours_per_month)
    return AlwaysOn(price.usd_per_hour, points, pricing.latency_target_ms, price.min_replicas,
                    pricing.peak_to_average, price.target_utilisation, pricing.hours_per_month)


def training_usd(metrics: dict[str, float], pricing: PricingConfig) -> float:
    """One training run: its measured time on priced hardware, or its tokens at a provider's training price."""
    rates = pricing.finetune
    if rates.training_usd_per_mtok is not None:
        return metrics.get("train_tokens", 0.0) * rates.training_usd_per_mtok / 1e6
    return metrics.get("train_time_s", 0.0) / SECONDS_PER_HOUR * rates.usd_per_hour


@dataclass(frozen=True)
class Ownership:
    """What an arm's route costs to build and keep, besides running it (from the arm and the run)."""

    kind: str  # "prompt" | "finetuned"
    given_fixed_usd: float | None = None  # the arm's `fixed_cost_usd`: replaces training and labelling
    search_runs: int = 1
    retrain_every_months: float | None = None
    n_train: int = 0
    n_eval: int = 0
    # Labels that did not come at the per-example rate: a teacher model's calls (distillation), priced as measured.
    labelling_usd: float | None = None


def evaluation_usd(price: Price, metrics: dict[str, float], running: RunningCost, n_eval: int,
                   pricing: PricingConfig) -> float:
    """What evaluating the route on the test rows costs: an API's calls at the configured volume's price; a
    self-hosted model's busy time for them at its measured throughput (not a share of a month's idle replicas)."""
    if isinstance(price, PerTokenPrice):
        return n_eval * running.monthly(pricing.monthly_calls) / pricing.monthly_calls
    throughput = metrics.get("throughput_calls_per_s") or 0.0
    return n_eval / throughput / SECONDS_PER_HOUR * price.usd_per_hour * price.premium if throughput else 0.0


def route(price: Price, metrics: dict[str, float], pricing: PricingConfig, own: Ownership,
          running: RunningCost | None = None) -> Route:
    """The arm as a route: `running` (default: as deployed) plus people, labels, training x search runs,
    evaluation (the test rows at the configured volume's cost a call) and retraining."""
    running = running or running_cost(price, metrics, pricing)
    people, label_usd = pricing.people, pricing.labelling_usd_per_example()
    evaluation = evaluation_usd(price, metrics, running, own.n_eval, pricing)
    if own.kind != "finetuned":
        return Route(running, people.prompt_hours, people.usd_per_hour,
                     training_usd=own.given_fixed_usd if own.given_fixed_usd is not None else pricing.prompt_fixed_usd,
                     evaluation_usd=evaluation)
    given = own.given_fixed_usd is not None
    return Route(running, people.finetune_hours, people.usd_per_hour,
                 labelling_usd=0.0 if given else own.n_train * label_usd if own.labelling_usd is None
                 else own.labelling_usd,
                 training_usd=own.given_fixed_usd if given else training_usd(metrics, pricing),
                 search_runs=1 if given else own.search_runs, evaluation_usd=evaluation,
                 retrain_every_months=own.retrain_every_months,
                 retrain_labelling_usd=pricing.labelling.new_rows_per_retrain * label_usd,
                 retrain_people_hours=people.retrain_hours)


def scaled(price: Price, metrics: dict[str, float], price_factor: float = 1.0,
           throughput_factor: float = 1.0) -> tuple[Price, dict[str, float]]:
    """The price and metrics with the price or the measured throughput multiplied (sensitivity)."""
    if isinstance(price, PerTokenPrice):
        fields = ("input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok",
                  "cache_write_usd_per_mtok", "batch_input_usd_per_mtok", "batch_output_usd_per_mtok")
        price = price.model_copy(update={f: getattr(price, f) * price_factor for f in fields
                                         if getattr(price, f) is not None})
    else:
        price = price.model_copy(update={"usd_per_hour": price.usd_per_hour * price_factor})
    return price, {k: v * throughput_factor if k.startswith("throughput_calls_per_s") else v
                   for k, v in metrics.items()}


def with_errors(r: Route, accuracy: float, error_cost_usd: float) -> Route:
    """The same route with each wrong answer priced at `error_cost_usd`."""
    return replace(r, running=WithErrors(r.running, (1.0 - accuracy) * error_cost_usd))
