"""Cost and break-even math. Pure functions of measured numbers and prices; no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import PerHourPrice, PerTokenPrice

SECONDS_PER_HOUR = 3600.0


def per_token_cost(
    prompt_tokens: float, completion_tokens: float, price: PerTokenPrice, cached_prompt_tokens: float = 0.0
) -> float:
    """USD for one API call; cached tokens (the shared prefix) bill at the cached rate where one is set."""
    if price.cached_input_usd_per_mtok is None:
        cached_prompt_tokens = 0.0
    fresh = prompt_tokens - cached_prompt_tokens
    usd = fresh * price.input_usd_per_mtok + completion_tokens * price.output_usd_per_mtok
    if cached_prompt_tokens:
        usd += cached_prompt_tokens * price.cached_input_usd_per_mtok
    return usd / 1e6


def per_hour_cost(throughput_calls_per_s: float, price: PerHourPrice) -> float:
    """USD for one call on a self-hosted server kept busy at the measured throughput."""
    if throughput_calls_per_s <= 0:
        raise ValueError("throughput must be positive")
    return price.usd_per_hour / SECONDS_PER_HOUR / throughput_calls_per_s


def cost_per_call(
    price: PerTokenPrice | PerHourPrice,
    prompt_tokens: float,
    completion_tokens: float,
    throughput_calls_per_s: float,
    cached_prompt_tokens: float = 0.0,
) -> float:
    if isinstance(price, PerTokenPrice):
        return per_token_cost(prompt_tokens, completion_tokens, price, cached_prompt_tokens)
    return per_hour_cost(throughput_calls_per_s, price)


def finetune_fixed_cost(train_time_s: float, usd_per_hour: float, n_train: int, labelling_usd_per_example: float) -> float:
    """One-off cost of the fine-tuned route: measured training time on priced hardware plus labelling."""
    return train_time_s / SECONDS_PER_HOUR * usd_per_hour + n_train * labelling_usd_per_example


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


def total_cost(fixed: float, per_call: float, calls: float) -> float:
    return fixed + per_call * calls


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or nan where the denominator is zero."""
    return numerator / denominator if denominator else math.nan
