"""Serving as deployed and APIs as billed: the throughput an arrival rate can batch under a latency target,
replicas sized for the peak, per-second billing with cold starts, and a provider's caching and batch rules.
Pure functions of measured numbers and prices; no I/O.

Arrivals are modelled as Poisson at the month's average rate (calls / seconds in the month); always-on
replicas are sized for `peak_to_average` times it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from pipeline.economics.costing import HOURS_PER_MONTH, SECONDS_PER_HOUR
from pipeline.economics.prices import PerTokenPrice


@dataclass(frozen=True)
class ThroughputPoint:
    """One measured pass: calls served a second at this batch size, and its p95 latency."""

    batch_size: int
    calls_per_s: float
    p95_ms: float


def batch_forms_from(point: ThroughputPoint, latency_target_ms: float) -> float | None:
    """The lowest arrival rate (calls/s) at which this batch size forms within the latency target.

    The first call of a batch may wait window = latency_target - p95 (seconds) for the others; the batch
    forms when the calls expected by then fill it: 1 + rate x window >= batch_size, so
    rate >= (batch_size - 1) / window. Batch 1 forms at any rate; None where p95 misses the target.
    """
    window_s = (latency_target_ms - point.p95_ms) / 1000
    if window_s < 0:
        return None
    if point.batch_size <= 1:
        return 0.0
    return (point.batch_size - 1) / window_s if window_s > 0 else None


def usable_throughput(points: tuple[ThroughputPoint, ...], arrival_rate: float, latency_target_ms: float) -> float:
    """The best throughput among the measured batch sizes that form at this arrival rate (see
    `batch_forms_from`); the smallest batch's where none meets the latency target (it is missed anyway)."""
    usable = [p.calls_per_s for p in points
              if (rate := batch_forms_from(p, latency_target_ms)) is not None and arrival_rate >= rate]
    return max(usable) if usable else min(points, key=lambda p: p.batch_size).calls_per_s


def _regime_volumes(points: tuple[ThroughputPoint, ...], latency_target_ms: float, rate_per_call: float,
                    max_calls: float) -> list[float]:
    """Monthly volumes in (0, max_calls) at which a larger batch starts to form (the throughput changes)."""
    rates = [r for p in points if (r := batch_forms_from(p, latency_target_ms))]
    return sorted(v for r in rates if 0 < (v := r / rate_per_call) < max_calls)


@dataclass(frozen=True)
class AlwaysOn:
    """Replicas billed by the hour whether busy or not, sized for the peak:
    replicas(V) = max(min_replicas, ceil(peak_rate / (throughput(peak_rate) x target_utilisation))),
    peak_rate = V / seconds_in_month x peak_to_average; monthly(V) = replicas x hours x usd_per_hour."""

    usd_per_hour: float
    points: tuple[ThroughputPoint, ...]
    latency_target_ms: float
    min_replicas: int = 1
    peak_to_average: float = 3.0
    target_utilisation: float = 1.0
    hours_per_month: float = HOURS_PER_MONTH
    linear: ClassVar[bool] = True

    def _peak_rate(self, monthly_calls: float) -> float:
        return monthly_calls / (self.hours_per_month * SECONDS_PER_HOUR) * self.peak_to_average

    def replicas(self, monthly_calls: float) -> int:
        rate = self._peak_rate(monthly_calls)
        per_replica = usable_throughput(self.points, rate, self.latency_target_ms) * self.target_utilisation
        return max(self.min_replicas, math.ceil(rate / per_replica - 1e-12))

    def monthly(self, monthly_calls: float) -> float:
        return self.replicas(monthly_calls) * self.hours_per_month * self.usd_per_hour

    def steps(self, max_calls: float) -> list[float]:
        """Volumes below `max_calls` where the replica count changes: a larger batch starts to form, or one
        more replica is needed at the throughput of the batching regime the volume is in."""
        per_call = self._peak_rate(1.0)
        bounds = [0.0, *_regime_volumes(self.points, self.latency_target_ms, per_call, max_calls), max_calls]
        found = set(bounds[1:-1])
        for lo, hi in zip(bounds, bounds[1:]):
            throughput = usable_throughput(self.points, self._peak_rate((lo + hi) / 2), self.latency_target_ms)
            capacity = throughput * self.target_utilisation / per_call  # calls a month one replica serves
            k = max(self.min_replicas, 1, math.floor(lo / capacity))
            while k * capacity < hi:
                if k * capacity > lo:
                    found.add(k * capacity)
                k += 1
        return sorted(found)


@dataclass(frozen=True)
class PerSecond:
    """Replicas billed by the second they run, at usd_per_hour x premium; with min_replicas 0 they scale to
    zero after `idle_timeout_s` without a call, and each scale-up from zero bills `cold_start_s`.

    busy_s(V)    = V / throughput(rate), rate = V / seconds_in_month (batches form at the average rate)
    scale_ups(V) = V x exp(-rate x idle_timeout_s) when min_replicas is 0 (a call that finds no call in the
                   idle window before it), else 0
    monthly(V)   = (max(min_replicas x seconds_in_month, busy_s) + cold_start_s x scale_ups)
                   x usd_per_hour / 3600 x premium.
    Idle seconds before a scale-down are not billed here.
    """

    usd_per_hour: float
    points: tuple[ThroughputPoint, ...]
    latency_target_ms: float
    premium: float = 1.0
    cold_start_s: float = 0.0
    idle_timeout_s: float = 300.0
    min_replicas: int = 0
    hours_per_month: float = HOURS_PER_MONTH

    @property
    def linear(self) -> bool:
        return self.min_replicas > 0 or self.cold_start_s == 0

    def _seconds(self) -> float:
        return self.hours_per_month * SECONDS_PER_HOUR

    def busy_seconds(self, monthly_calls: float) -> float:
        rate = monthly_calls / self._seconds()
        return monthly_calls / usable_throughput(self.points, rate, self.latency_target_ms)

    def scale_ups(self, monthly_calls: float) -> float:
        if self.min_replicas > 0:
            return 0.0
        return monthly_calls * math.exp(-monthly_calls / self._seconds() * self.idle_timeout_s)

    def monthly(self, monthly_calls: float) -> float:
        billed = (max(self.min_replicas * self._seconds(), self.busy_seconds(monthly_calls))
                  + self.cold_start_s * self.scale_ups(monthly_calls))
        return billed * self.usd_per_hour / SECONDS_PER_HOUR * self.premium

    def steps(self, max_calls: float) -> list[float]:
        """Where the throughput changes, and where busy seconds pass the always-on replicas' seconds."""
        seconds = self._seconds()
        bounds = [0.0, *_regime_volumes(self.points, self.latency_target_ms, 1 / seconds, max_calls), max_calls]
        kinks = {(lo, hi, self.min_replicas * seconds * usable_throughput(self.points, (lo + hi) / 2 / seconds,
                                                                          self.latency_target_ms))
                 for lo, hi in zip(bounds, bounds[1:])}
        return sorted(set(bounds[1:-1]) | {v for lo, hi, v in kinks if lo < v < hi})


def cache_hit_rate(monthly_calls: float, cache_ttl_s: float, hours_per_month: float = HOURS_PER_MONTH) -> float:
    """Share of calls that find the prefix still cached: with Poisson arrivals at rate = calls / seconds in
    the month, P(another call within the ttl before it) = 1 - exp(-rate x ttl)."""
    return 1.0 - math.exp(-monthly_calls / (hours_per_month * SECONDS_PER_HOUR) * cache_ttl_s)


@dataclass(frozen=True)
class ProviderRule:
    """How a provider bills caching and its batch API."""

    batch_factor: float  # batch price / standard price, input and output
    batch_stacks_with_cache: bool  # in a batch, cache reads and writes get batch_factor too; else no cache price
    cache_step_tokens: int  # the cached prefix is a multiple of this
    cache_min_tokens: int  # the shortest prefix cached
    cache_ttl_s: float  # how long an unused prefix stays cached


# Sources (looked up 2026-12): OpenAI caches prompts of 1,024 tokens or more, writes free
# (developers.openai.com/api/docs/guides/prompt-caching), in 128-token steps; its Batch API halves input and
# output, and cached input stacks with it only on GPT-5 and later models (leanlm.ai/blog/llm-batch-api;
# agentbeck.bot/report/100396). Anthropic's Message Batches charge 50% on all usage, cache writes and reads
# included (dev.to/neverpaytwice "Claude Batch API: half price"; claudecodeguides.com: batch x cache read =
# 5% of input), minimum 1,024 tokens on Sonnet/Opus, 5-minute TTL (portkey.ai Anthropic prompt-caching docs).
PROVIDER_RULES: dict[str, ProviderRule] = {
    "openai": ProviderRule(0.5, False, 128, 1024, 300.0),
    "openai-gpt5": ProviderRule(0.5, True, 128, 1024, 300.0),
    "anthropic": ProviderRule(0.5, True, 1, 1024, 300.0),
}


def cacheable_prefix(prefix_tokens: float, rule: ProviderRule, minimum: int = 0) -> float:
    """The static prefix the provider caches: 0 below its minimum, else rounded down to its step."""
    if prefix_tokens < max(rule.cache_min_tokens, minimum):
        return 0.0
    return math.floor(prefix_tokens / rule.cache_step_tokens) * rule.cache_step_tokens


def billed_call_cost(prompt_tokens: float, completion_tokens: float, prefix_tokens: float, price: PerTokenPrice,
                     rule: ProviderRule, hit_rate: float, batch: bool = False,
                     cached_tokens: float | None = None) -> float:
    """USD for one API call as the provider bills it.

    cached = cacheable_prefix(min(prefix, prompt)) (0 when the price has no cached rate); read = the
    server-reported `cached_tokens` when given, else cached x hit_rate; written = cached - read;
    cost = (fresh x input + read x cached_input + written x cache_write (else input) + completion x output) / 1e6.
    In a batch input and output are x batch_factor; reads and writes too where the rule stacks them, else
    every prompt token bills at the batch input rate. Batch rates follow the rule, not the catalog's columns
    (see `batch_price_mismatches`).
    """
    cached, read = 0.0, 0.0
    if price.cached_input_usd_per_mtok is not None:  # without a cached rate every prompt token bills as input
        cached = cacheable_prefix(min(prefix_tokens, prompt_tokens), rule, price.cache_min_prefix_tokens)
        read = min(cached_tokens, prompt_tokens) if cached_tokens is not None else cached * hit_rate
    written = max(0.0, cached - read)
    input_rate, output_rate = price.input_usd_per_mtok, price.output_usd_per_mtok
    read_rate = price.cached_input_usd_per_mtok or 0.0
    write_rate = price.cache_write_usd_per_mtok if price.cache_write_usd_per_mtok is not None else input_rate
    if batch:
        f = rule.batch_factor
        input_rate, output_rate = input_rate * f, output_rate * f
        read_rate, write_rate = (read_rate * f, write_rate * f) if rule.batch_stacks_with_cache else (input_rate,
                                                                                                      input_rate)
    fresh = prompt_tokens - read - written
    return (fresh * input_rate + read * read_rate + written * write_rate + completion_tokens * output_rate) / 1e6


def batch_price_mismatches(price: PerTokenPrice, rule: ProviderRule, rel: float = 0.01) -> list[str]:
    """The catalog row's batch fields that are not batch_factor x the standard price (within `rel`)."""
    pairs = {"batch_input_usd_per_mtok": (price.batch_input_usd_per_mtok, price.input_usd_per_mtok),
             "batch_output_usd_per_mtok": (price.batch_output_usd_per_mtok, price.output_usd_per_mtok)}
    return [name for name, (batch, standard) in pairs.items()
            if batch is not None and abs(batch - standard * rule.batch_factor) > rel * standard * rule.batch_factor]


def provider_rule(provider: str | None) -> ProviderRule:
    """The billing rule of a price's provider (LiteLLM's provider names); OpenAI's where unknown."""
    return PROVIDER_RULES.get(provider or "openai", PROVIDER_RULES["openai"])


def price_notes(name: str, price: PerTokenPrice, today: str, max_age_days: int) -> list[str]:
    """One line each for what a reader should doubt in a price: past its deprecation date, older than
    `max_age_days`, or batch rates that are not the provider's batch rule applied to its prices."""
    import datetime

    notes, day = [], datetime.date.fromisoformat(today)
    if price.deprecation_date and datetime.date.fromisoformat(price.deprecation_date[:10]) < day:
        notes.append(f"price {name}: the model was deprecated on {price.deprecation_date[:10]}")
    if price.date and (day - datetime.date.fromisoformat(price.date[:10])).days > max_age_days:
        notes.append(f"price {name}: dated {price.date[:10]}, older than pricing.max_price_age_days "
                     f"({max_age_days}); check the provider's current price")
    wrong = batch_price_mismatches(price, provider_rule(price.provider))
    if wrong:
        notes.append(f"price {name}: {', '.join(wrong)} is not {provider_rule(price.provider).batch_factor:g}x the "
                     "standard price, as the provider's batch rule has it; the batch rule is used")
    return notes
