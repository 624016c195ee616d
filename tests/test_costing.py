import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.economics.prices import PerTokenPrice
from pipeline.economics.costing import break_even
from pipeline.economics.serving import PROVIDER_RULES, billed_call_cost

API = PerTokenPrice(kind="per_token", input_usd_per_mtok=2.5, output_usd_per_mtok=10.0)


def cached_call_cost(prompt, completion, price, prefix_tokens, hit_rate=1.0, provider="openai", batch=False):
    return billed_call_cost(prompt, completion, prefix_tokens, price, PROVIDER_RULES[provider], hit_rate, batch)


def test_per_token_cost_by_hand():
    # 800 in * 2.5/1e6 + 5 out * 10/1e6 = 0.002 + 0.00005
    assert cached_call_cost(800, 5, API, prefix_tokens=0) == pytest.approx(0.00205)
    # without a cached price a long prefix bills as normal input
    assert cached_call_cost(1500, 5, API, prefix_tokens=1200) == pytest.approx(0.00380)


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
        assert fixed_ft + per_call_ft * n == pytest.approx(fixed_prompt + per_call_prompt * n,
                                                                     rel=1e-6, abs=1e-9)
    # beyond break-even the fine-tuned route is never dearer
    later = n * 2 + 1
    assert fixed_ft + per_call_ft * later <= fixed_prompt + per_call_prompt * later + 1e-9
    assert result.payback_months == pytest.approx(n / monthly)


@given(st.floats(0, 1e6), st.floats(0, 1e3), st.floats(0, 100), st.floats(0, 100))
def test_per_token_cost_is_non_negative_and_monotone(prompt, completion, price_in, price_out):
    price = PerTokenPrice(kind="per_token", input_usd_per_mtok=price_in, output_usd_per_mtok=price_out)
    cost = cached_call_cost(prompt, completion, price, prefix_tokens=0)
    assert cost >= 0
    assert cached_call_cost(prompt + 1, completion, price, prefix_tokens=0) >= cost


# --- deployment, levers and both break-evens (issue: decision-grade economics) --------------------------

from pipeline.economics.costing import (ArmCost, Deployment, monthly_break_even,  # noqa: E402
                              one_off_break_even, quality_adjusted_per_call, sensitivity)

OPENAI_LIKE = PerTokenPrice(kind="per_token", input_usd_per_mtok=2.5, output_usd_per_mtok=10.0,
                            cached_input_usd_per_mtok=1.25, batch_input_usd_per_mtok=1.25,
                            batch_output_usd_per_mtok=5.0, cache_min_prefix_tokens=1024)
ANTHROPIC_LIKE = PerTokenPrice(kind="per_token", input_usd_per_mtok=1.0, output_usd_per_mtok=5.0,
                               cached_input_usd_per_mtok=0.1, cache_write_usd_per_mtok=1.25,
                               cache_min_prefix_tokens=1024, cache_hit_rate=0.9)
BOX = Deployment(usd_per_hour=0.10, min_replicas=1, target_utilisation=0.5)  # $73 a month per replica


def test_cached_call_cost_by_hand():
    # OpenAI's rule caches whole 128-token steps: a 1,280-token prefix is cached whole.
    # 220 fresh * 2.5 + 1280 read * 1.25 + 5 out * 10 = 550 + 1600 + 50 = 2200 per 1e6
    assert cached_call_cost(1500, 5, OPENAI_LIKE, prefix_tokens=1280) == pytest.approx(0.0022)
    # a 900-token prefix is not cached at all: 1500 * 2.5 + 50 = 3800 per 1e6
    assert cached_call_cost(1500, 5, OPENAI_LIKE, prefix_tokens=900) == pytest.approx(0.0038)
    # Anthropic's rule: 1350 read * 0.1 + 150 written * 1.25 + 500 fresh * 1.0 + 10 out * 5 = 872.5 per 1e6
    assert cached_call_cost(2000, 10, ANTHROPIC_LIKE, prefix_tokens=1500, hit_rate=0.9,
                            provider="anthropic") == pytest.approx(0.0008725)
    # OpenAI's batch API halves input and output and does not stack with the cache (before GPT-5):
    # 1500 * 1.25 + 5 * 5 = 1900 per 1e6
    assert cached_call_cost(1500, 5, OPENAI_LIKE, prefix_tokens=1280, batch=True) == pytest.approx(0.0019)
    # a prefix counted longer than the prompt the server counted never makes input negative: 1,024 cached of 1,100
    assert cached_call_cost(1100, 0, OPENAI_LIKE, prefix_tokens=1200) == pytest.approx((76 * 2.5 + 1024 * 1.25) / 1e6)


def test_replicas_and_monthly_cost_by_hand():
    # 2 calls/s * 3600 * 730 h * 0.5 = 2,628,000 calls a month per replica
    assert BOX.capacity(2.0) == pytest.approx(2_628_000)
    cost = ArmCost(deployment=BOX, throughput_calls_per_s=2.0)
    assert cost.replicas(100_000) == 1 and cost.replicas(2_628_000) == 1 and cost.replicas(2_628_001) == 2
    assert cost.replicas(10_000_000) == 4  # ceil(3.805)
    assert cost.monthly(10_000_000) == pytest.approx(4 * 730 * 0.10)
    # always on: 100,000 calls pay for a whole box, $73, not 100,000 / 2 s of it
    assert cost.per_call(100_000) == pytest.approx(73 / 100_000)
    assert ArmCost(deployment=Deployment(0.10, min_replicas=0), throughput_calls_per_s=2.0).monthly(0) == 0


def test_one_off_break_even_at_the_configured_volume_by_hand():
    api = ArmCost(per_call_usd=0.002)
    tuned = ArmCost(deployment=BOX, throughput_calls_per_s=2.0, fixed_usd=50.0)
    # at 100,000 calls a month the box costs 0.00073 a call: 50 / (0.002 - 0.00073) = 39,370.08 calls
    result = one_off_break_even(api, tuned, 100_000)
    assert result.calls == pytest.approx(50 / 0.00127)
    # at 10,000 calls a month the box costs 0.0073 a call, more than the API: never
    assert one_off_break_even(api, tuned, 10_000).never


def test_monthly_break_even_by_hand():
    api = ArmCost(per_call_usd=0.002)
    tuned = ArmCost(deployment=BOX, throughput_calls_per_s=2.0)
    # one box ($73) beats the API once 0.002 * V > 73: V = 36,500
    assert monthly_break_even(api, tuned, 1e9) == pytest.approx(36_500)
    slow = ArmCost(deployment=BOX, throughput_calls_per_s=1.0)  # 1,314,000 calls a box
    fast = ArmCost(deployment=BOX, throughput_calls_per_s=4.0)
    # the same box price: the fast arm is cheaper once the slow one needs a second box
    assert monthly_break_even(slow, fast, 1e9) == pytest.approx(1_314_000)
    assert monthly_break_even(fast, slow, 1e9) is None
    # a box at $2.78e-5 a call at best never beats an API at $1e-5 a call
    assert monthly_break_even(ArmCost(per_call_usd=1e-5), tuned, 1e9) is None
    # always cheaper: from the first call
    assert monthly_break_even(ArmCost(per_call_usd=0.01), ArmCost(per_call_usd=0.001), 1e9) == 0
    # cheaper for a while, then dearer for good: one box (1,576,800 calls at 1 call/s and 60%) beats an API at
    # $0.00006 a call above 1,216,667 calls, but past its capacity two boxes ($146) cost more than the API
    # until 2,433,333 calls, and so on: it is cheaper for good only where the API passes every step.
    box = ArmCost(deployment=Deployment(0.10, 1, 0.6), throughput_calls_per_s=1.0)
    api = ArmCost(per_call_usd=0.00006)
    found = monthly_break_even(api, box, 1e8)
    assert found is None or found > 1_576_800
    # with no always-on box and steps that interleave: the slow arm pays from its first call
    slow = ArmCost(deployment=Deployment(0.10, 0, 0.5), throughput_calls_per_s=1.0)  # 1,314,000 calls a box
    fast = ArmCost(deployment=Deployment(0.15, 0, 0.5), throughput_calls_per_s=2.5)  # 3,285,000 calls a box
    # slow pays 73 x ceil(V / 1,314,000), fast 109.5 x ceil(V / 3,285,000). Fast is cheaper on
    # (1,314,000, 3,285,000] (2-3 slow boxes against one fast), but on (3,285,000, 3,942,000] both pay $219
    # (3 slow, 2 fast); from 3,942,000 on (4 slow boxes, $292, against 2 fast, $219) it stays cheaper:
    # a fast box costs $3.3e-5 a call at capacity, a slow one $5.6e-5. A plain scan of the steps agrees.
    points = sorted({k * 1_314_000 for k in range(0, 80)} | {k * 3_285_000 for k in range(0, 32)})

    def fast_cheaper(v):
        return 109.5 * math.ceil(v / 3_285_000) < 73 * math.ceil(v / 1_314_000)

    expected = next(p for i, p in enumerate(points) if all(fast_cheaper(q + 1) and (q == p or fast_cheaper(q))
                                                          for q in points[i:]))
    assert monthly_break_even(slow, fast, 1e8) == pytest.approx(expected)
    assert expected == 3_942_000


def test_quality_adjusted_cost_and_sensitivity_by_hand():
    # 20% wrong at $0.50 each adds $0.10 a call
    assert quality_adjusted_per_call(0.001, 0.8, 0.5) == pytest.approx(0.101)
    rows = sensitivity(lambda f: 100 * f.get("price", 1.0) / f.get("speed", 1.0), ["price", "speed"])
    assert rows == [("price", pytest.approx(50), pytest.approx(150)), ("speed", pytest.approx(200), pytest.approx(200 / 3))]


@given(calls=st.floats(0, 1e9), more=st.floats(0, 1e9), usd=st.floats(0.01, 100), higher=st.floats(1, 10),
       throughput=st.floats(0.01, 1000), per_call=st.floats(0, 0.1))
def test_monthly_cost_grows_with_volume_and_price_and_is_never_negative(calls, more, usd, higher, throughput,
                                                                        per_call):
    cost = ArmCost(per_call_usd=per_call, deployment=Deployment(usd, 1, 0.6), throughput_calls_per_s=throughput)
    dearer = ArmCost(per_call_usd=per_call, deployment=Deployment(usd * higher, 1, 0.6),
                     throughput_calls_per_s=throughput)
    assert 0 <= cost.monthly(calls) <= cost.monthly(calls + more)
    assert cost.monthly(calls) <= dearer.monthly(calls)


@settings(deadline=None)
@given(base=st.floats(1e-6, 1e-2), dearer=st.floats(1, 5), fixed=st.floats(0, 1e4), throughput=st.floats(0.1, 100))
def test_a_dearer_baseline_never_delays_either_break_even(base, dearer, fixed, throughput):
    tuned = ArmCost(deployment=BOX, throughput_calls_per_s=throughput, fixed_usd=fixed)
    cheap, costly = ArmCost(per_call_usd=base), ArmCost(per_call_usd=base * dearer)
    a, b = one_off_break_even(cheap, tuned, 100_000), one_off_break_even(costly, tuned, 100_000)
    assert b.calls is not None if a.calls is not None else True
    if a.calls is not None:
        assert 0 <= b.calls <= a.calls + 1e-6
    m1, m2 = monthly_break_even(cheap, tuned, 1e8), monthly_break_even(costly, tuned, 1e8)
    if m1 is not None:
        assert m2 is not None and 0 <= m2 <= m1 * (1 + 1e-9)


@settings(deadline=None, max_examples=60)
@given(usd=st.floats(0.05, 5), usd2=st.floats(0.05, 5), thr=st.floats(0.5, 50), thr2=st.floats(0.5, 50),
       min1=st.integers(0, 2), min2=st.integers(0, 2), api=st.floats(0, 1e-4),
       probes=st.lists(st.floats(0, 1), min_size=20, max_size=20))
def test_past_the_monthly_break_even_the_candidate_is_always_cheaper(usd, usd2, thr, thr2, min1, min2, api, probes):
    base = ArmCost(per_call_usd=api, deployment=Deployment(usd, min1, 0.6), throughput_calls_per_s=thr)
    cand = ArmCost(deployment=Deployment(usd2, min2, 0.6), throughput_calls_per_s=thr2)
    top = 2e8
    found = monthly_break_even(base, cand, top)
    if found is None:
        return
    for p in probes:  # whole calls after the break-even, and each arm's replica steps after it
        v = found + 1 + p * (top - found - 1)
        assert cand.monthly(v) < base.monthly(v) * (1 + 1e-9)
    for capacity in (base.deployment.capacity(thr), cand.deployment.capacity(thr2)):
        k = math.floor(found / capacity) + 1
        while k * capacity < top and k < 200:
            assert cand.monthly(k * capacity + 1) < base.monthly(k * capacity + 1) * (1 + 1e-9)
            k += 1
