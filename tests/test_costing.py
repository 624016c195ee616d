import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pipeline.config import PerHourPrice, PerTokenPrice
from pipeline.costing import (
    break_even, cost_per_call, finetune_fixed_cost, per_hour_cost, per_token_cost, total_cost,
)

API = PerTokenPrice(kind="per_token", input_usd_per_mtok=2.5, output_usd_per_mtok=10.0)
CACHED = PerTokenPrice(kind="per_token", input_usd_per_mtok=2.5, output_usd_per_mtok=10.0,
                       cached_input_usd_per_mtok=1.25)
SERVER = PerHourPrice(kind="per_hour", usd_per_hour=3.6)


def test_per_token_cost_by_hand():
    # 800 in * 2.5/1e6 + 5 out * 10/1e6 = 0.002 + 0.00005
    assert per_token_cost(800, 5, API) == pytest.approx(0.00205)


def test_cached_prefix_bills_at_the_cached_rate():
    # 600 cached * 1.25/1e6 + 200 fresh * 2.5/1e6 + 5 * 10/1e6 = 0.00075 + 0.0005 + 0.00005
    assert per_token_cost(800, 5, CACHED, cached_prompt_tokens=600) == pytest.approx(0.0013)
    # without a cached price the prefix bills as normal input
    assert per_token_cost(800, 5, API, cached_prompt_tokens=600) == pytest.approx(0.00205)


def test_per_hour_cost_by_hand():
    # $3.6/h = $0.001/s; at 4 calls/s a call costs $0.00025
    assert per_hour_cost(4.0, SERVER) == pytest.approx(0.00025)
    assert cost_per_call(SERVER, 800, 5, 4.0) == pytest.approx(0.00025)
    with pytest.raises(ValueError):
        per_hour_cost(0.0, SERVER)


def test_finetune_fixed_cost_by_hand():
    # 1800 s at $2/h = $1, plus 1000 examples at $0.05 = $50
    assert finetune_fixed_cost(1800, 2.0, 1000, 0.05) == pytest.approx(51.0)


def test_break_even_by_hand():
    result = break_even(fixed_prompt=0.0, per_call_prompt=0.002, fixed_finetune=100.0, per_call_finetuned=0.001,
                        monthly_calls=50_000)
    assert result.calls == pytest.approx(100_000)
    assert result.payback_months == pytest.approx(2.0)
    assert not result.never


def test_break_even_counts_the_prompt_routes_fixed_cost():
    result = break_even(fixed_prompt=20.0, per_call_prompt=0.003, fixed_finetune=50.0, per_call_finetuned=0.001,
                        monthly_calls=1000)
    assert result.calls == pytest.approx(15_000)  # (50 - 20) / 0.002


@pytest.mark.parametrize("per_call_finetuned", [0.002, 0.0025])
def test_break_even_never_when_finetuning_saves_nothing_per_call(per_call_finetuned):
    result = break_even(0.0, 0.002, 10.0, per_call_finetuned, 1000)
    assert result.never and result.calls is None and result.payback_months is None


def test_break_even_is_zero_when_finetuning_is_cheaper_up_front_too():
    assert break_even(10.0, 0.002, 5.0, 0.001, 1000).calls == 0.0


@given(
    st.floats(0, 1e4), st.floats(1e-7, 1.0), st.floats(0, 1e4), st.floats(0, 1.0), st.floats(1, 1e9),
)
def test_total_costs_meet_at_break_even(fixed_prompt, per_call_prompt, fixed_ft, per_call_ft, monthly):
    result = break_even(fixed_prompt, per_call_prompt, fixed_ft, per_call_ft, monthly)
    if per_call_ft >= per_call_prompt:
        assert result.never
        return
    assume(per_call_prompt - per_call_ft > 1e-9)
    n = result.calls
    assert n >= 0 and math.isfinite(n)
    if fixed_ft > fixed_prompt:
        assert total_cost(fixed_ft, per_call_ft, n) == pytest.approx(total_cost(fixed_prompt, per_call_prompt, n),
                                                                     rel=1e-6, abs=1e-9)
    # beyond break-even the fine-tuned route is never dearer
    later = n * 2 + 1
    assert total_cost(fixed_ft, per_call_ft, later) <= total_cost(fixed_prompt, per_call_prompt, later) + 1e-9
    assert result.payback_months == pytest.approx(n / monthly)


@given(st.floats(0, 1e6), st.floats(0, 1e3), st.floats(0, 100), st.floats(0, 100))
def test_per_token_cost_is_non_negative_and_monotone(prompt, completion, price_in, price_out):
    price = PerTokenPrice(kind="per_token", input_usd_per_mtok=price_in, output_usd_per_mtok=price_out)
    cost = per_token_cost(prompt, completion, price)
    assert cost >= 0
    assert per_token_cost(prompt + 1, completion, price) >= cost
