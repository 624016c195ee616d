"""Costs over a horizon, break-evens by volume and by month, serving as deployed, APIs as billed, the cost
curves and the verdict: every figure computed by hand in the comments (issues 28 and 33)."""

import math

import pytest

from pipeline.economics.costing import ArmCost, Deployment
from pipeline.economics.horizon import (CostRange, Route, break_even_monthly_calls, cost_curves, curve_volumes,
                                        horizon_cost, payback_months, verdict)
from pipeline.economics.prices import PerTokenPrice
from pipeline.economics.serving import (PROVIDER_RULES, AlwaysOn, PerSecond, ThroughputPoint, batch_forms_from,
                                        batch_price_mismatches, billed_call_cost, cache_hit_rate, cacheable_prefix,
                                        usable_throughput)

BOX = Deployment(usd_per_hour=0.10, min_replicas=1, target_utilisation=0.5)  # $73 a month per replica
OPENAI, GPT5, ANTHROPIC = PROVIDER_RULES["openai"], PROVIDER_RULES["openai-gpt5"], PROVIDER_RULES["anthropic"]
# batch 1: 2 calls/s at 100 ms; batch 8: 10 calls/s at 150 ms. Under a 500 ms target batch 8 may wait 0.35 s,
# so it forms from 1 + rate x 0.35 >= 8: rate >= 20 calls/s.
POINTS = (ThroughputPoint(1, 2.0, 100.0), ThroughputPoint(8, 10.0, 150.0))
SECONDS = 730 * 3600  # 2,628,000 seconds in a month


# --- 1. total cost of ownership over a horizon ------------------------------------------------------------

def test_a_horizon_with_two_retrainings_by_hand():
    route = Route(ArmCost(per_call_usd=0.001), people_hours=10, people_usd_per_hour=100, labelling_usd=200,
                  training_usd=30, search_runs=4, evaluation_usd=15, retrain_every_months=5,
                  retrain_labelling_usd=20, retrain_people_hours=2)
    # one-off: 10 h x $100 + $200 + $30 x 4 runs + $15 = $1,335
    assert route.one_off_usd == pytest.approx(1335)
    # each retraining: $30 training + $20 new labels + 2 h x $100 = $250; at months 5 and 10 of 12
    assert route.retraining_usd == pytest.approx(250)
    assert route.retrainings(12) == 2
    # 50,000 calls at $0.001 = $50 a month, x 12 = $600; total 1,335 + 2 x 250 + 600 = $2,435
    assert horizon_cost(route, 50_000, 12) == pytest.approx(2435)


def test_retrainings_come_strictly_before_the_horizons_end():
    def every(months):
        return Route(ArmCost(), retrain_every_months=months)
    assert every(4).retrainings(12) == 2  # months 4 and 8; one at month 12 would buy nothing
    assert every(4).retrainings(12.5) == 3  # 4, 8, 12
    assert every(6).retrainings(12) == 1 and every(12).retrainings(12) == 0 and every(13).retrainings(12) == 0
    assert Route(ArmCost()).retrainings(12) == 0
    with pytest.raises(ValueError):
        horizon_cost(every(4), 1000, -1)


# --- 2. break-even by volume, with its ranges ---------------------------------------------------------------

def test_a_tie_followed_by_a_cheaper_range():
    # the same $73 box: the baseline serves 1 call/s (1,314,000 calls a box a month), the candidate 4 (5,256,000)
    baseline = Route(ArmCost(deployment=BOX, throughput_calls_per_s=1.0), people_hours=1, people_usd_per_hour=50)
    candidate = Route(ArmCost(deployment=BOX, throughput_calls_per_s=4.0), people_hours=1, people_usd_per_hour=50)
    found = break_even_monthly_calls(baseline, candidate, 12, 1e7)
    # up to 1,314,000 one box each: tied; above, the baseline pays 2 to 8 boxes, the candidate 1 or 2
    assert found.calls == pytest.approx(1_314_000)
    assert found.ranges == (CostRange(0, pytest.approx(1_314_000), "tied"),
                            CostRange(pytest.approx(1_314_000), 1e7, "cheaper"))


def test_a_higher_one_off_cost_needs_more_than_one_saved_box():
    baseline = Route(ArmCost(deployment=BOX, throughput_calls_per_s=1.0))
    candidate = Route(ArmCost(deployment=BOX, throughput_calls_per_s=4.0), labelling_usd=1000)
    found = break_even_monthly_calls(baseline, candidate, 12, 1e7)
    # (1,314,000, 2,628,000]: one box saved, 12 x $73 = $876 < $1,000: still dearer by $124;
    # from 2,628,000 two boxes saved, $1,752 > $1,000: cheaper, and more so at every later step
    assert found.calls == pytest.approx(2_628_000)
    assert [(r.start, r.state) for r in found.ranges] == [(0, "dearer"), (pytest.approx(2_628_000), "cheaper")]


def test_a_route_that_dominates_pays_from_the_first_call_and_one_that_never_does():
    cheap, dear = Route(ArmCost(per_call_usd=0.001)), Route(ArmCost(per_call_usd=0.01))
    assert break_even_monthly_calls(dear, cheap, 12, 1e8).calls == 0
    assert break_even_monthly_calls(dear, cheap, 12, 1e8).ranges == (CostRange(0, 1e8, "cheaper"),)
    # a $73 box of 2,628,000 calls costs at best $2.78e-5 a call: never below an API at $1e-5
    box = Route(ArmCost(deployment=BOX, throughput_calls_per_s=2.0))
    never = break_even_monthly_calls(Route(ArmCost(per_call_usd=1e-5)), box, 12, 1e8)
    assert never.never and never.calls is None and never.ranges == (CostRange(0, 1e8, "dearer"),)


def test_an_api_against_one_box_with_a_one_off_cost():
    api = Route(ArmCost(per_call_usd=0.002))
    tuned = Route(ArmCost(deployment=BOX, throughput_calls_per_s=2.0), training_usd=438)
    # over 12 months: 438 + 12 x 73 = 1,314 against 12 x 0.002 x V: equal at V = 1,314 / 0.024 = 54,750
    found = break_even_monthly_calls(api, tuned, 12, 1e8)
    assert found.calls == pytest.approx(54_750)
    assert [r.state for r in found.ranges] == ["dearer", "cheaper"]


def test_cold_starts_are_solved_by_bisection():
    # per-second at $3.6/h x 1.5 = $0.0015 a second, batch 1 at 2 calls/s: $0.00075 a call busy, plus
    # 20 s x $0.0015 = $0.03 per cold start, V x exp(-V x 300 / 2,628,000) of them. Against an API at $0.001:
    # 0.03 exp(-kV) = 0.00025 at kV = ln 120 = 4.787492, V = 4.787492 x 8,760 = 41,938.43 calls a month
    serverless = Route(PerSecond(3.6, POINTS, 500.0, premium=1.5, cold_start_s=20))
    found = break_even_monthly_calls(Route(ArmCost(per_call_usd=0.001)), serverless, 12, 1e6)
    assert found.calls == pytest.approx(41_938.43, rel=1e-6)
    assert [r.state for r in found.ranges] == ["dearer", "cheaper"]
    # against an API at $0.0005 it is dearer until batches of 8 form: 20 calls/s = 52,560,000 calls a month
    late = break_even_monthly_calls(Route(ArmCost(per_call_usd=0.0005)), serverless, 12, 1e9)
    assert late.calls == pytest.approx(52_560_000)


# --- 3. payback in months -----------------------------------------------------------------------------

def test_payback_with_a_retraining_inside_it():
    baseline = Route(ArmCost(per_call_usd=0.003))  # $300 a month at 100,000 calls
    candidate = Route(ArmCost(per_call_usd=0.001), people_hours=7, people_usd_per_hour=100, training_usd=300,
                      retrain_every_months=3)  # $100 a month; one-off 700 + 300 = $1,000; $300 every 3 months
    # difference: 1000 - 200 t + 300 floor(t / 3). Month 3: 400 + 300 = 700; month 6: 100 + 300 = 400; it falls
    # to 0 at month 8, but month 9's retraining brings it to 100, which is paid back at 9.5; from month 12
    # (-200) it keeps falling by $100 a month on average.
    assert payback_months(baseline, candidate, 100_000) == pytest.approx(9.5)
    no_retraining = Route(ArmCost(per_call_usd=0.001), people_hours=10, people_usd_per_hour=100)
    assert payback_months(baseline, no_retraining, 100_000) == pytest.approx(5.0)  # 1,000 / 200


def test_payback_never_and_at_once():
    baseline = Route(ArmCost(per_call_usd=0.003))
    costly = Route(ArmCost(per_call_usd=0.001), training_usd=900, retrain_every_months=3)  # +$300 a month on average
    assert payback_months(baseline, costly, 100_000) == math.inf  # saves $200 a month, spends $300
    assert payback_months(baseline, Route(ArmCost(per_call_usd=0.001)), 100_000) == 0.0
    assert payback_months(baseline, Route(ArmCost(per_call_usd=0.003), training_usd=1), 100_000) == math.inf


# --- 4. serving as deployed -------------------------------------------------------------------------------

def test_the_throughput_the_arrival_rate_can_batch():
    assert batch_forms_from(POINTS[1], 500.0) == pytest.approx(20.0)  # 7 more calls in 0.35 s
    assert batch_forms_from(POINTS[0], 500.0) == 0.0
    assert usable_throughput(POINTS, 100_000 / SECONDS, 500.0) == 2.0  # 0.04 calls/s: batches never form
    assert usable_throughput(POINTS, 19.9, 500.0) == 2.0 and usable_throughput(POINTS, 20.0, 500.0) == 10.0
    assert usable_throughput(POINTS, 1000.0, 120.0) == 2.0  # batch 8's p95 (150 ms) misses a 120 ms target
    assert usable_throughput(POINTS, 1000.0, 50.0) == 2.0  # nothing meets 50 ms: batch 1 anyway


def test_always_on_replicas_sized_for_the_peak():
    box = AlwaysOn(0.10, POINTS, 500.0, min_replicas=1, peak_to_average=3.0)
    # peak rate = V x 3 / 2,628,000. 100,000 calls: 0.114/s, one box
    assert box.replicas(100_000) == 1 and box.monthly(100_000) == pytest.approx(73)
    # 10,000,000: 11.42/s, no batches of 8 (they need 20/s): ceil(11.42 / 2) = 6 boxes
    assert box.replicas(10_000_000) == 6 and box.monthly(10_000_000) == pytest.approx(438)
    # 20,000,000: 22.83/s, batches of 8 at 10 calls/s: ceil(2.283) = 3 boxes; more calls, fewer boxes
    assert box.replicas(20_000_000) == 3
    # steps: a box per 1,752,000 calls (2 calls/s x 2,628,000 / 3) until batching at 17,520,000 calls
    # (20/s x 2,628,000 / 3), then one per 8,760,000 (10 calls/s): the next at 3 x 8,760,000
    expected = [1_752_000 * k for k in range(1, 10)] + [17_520_000, 26_280_000]
    assert box.steps(30_000_000) == pytest.approx(expected)


def test_per_second_billing_with_cold_starts():
    serverless = PerSecond(3.6, POINTS, 500.0, premium=1.5, cold_start_s=20, idle_timeout_s=300)  # $0.0015 a s
    # 1,000 calls: 500 busy seconds at 2 calls/s; 1,000 x exp(-1,000 x 300 / 2,628,000) = 1,000 x 0.892119
    # = 892.12 scale-ups from zero, 20 s each: 500 + 17,842.39 = 18,342.39 s x $0.0015 = $27.5136
    assert serverless.scale_ups(1000) == pytest.approx(892.119, rel=1e-5)
    assert serverless.monthly(1000) == pytest.approx(27.5136, rel=1e-5)
    # 100,000,000 calls: 38/s, batches of 8 at 10 calls/s: 10,000,000 s x $0.0015 = $15,000; no cold starts
    assert serverless.monthly(100_000_000) == pytest.approx(15_000)
    # one replica kept on: a whole month of seconds, 2,628,000 x $0.0015 = $3,942, and no cold start
    warm = PerSecond(3.6, POINTS, 500.0, premium=1.5, cold_start_s=20, min_replicas=1)
    assert warm.monthly(1000) == pytest.approx(3942) and warm.linear and not serverless.linear
    # it bends where busy seconds pass the month: 2,628,000 s x 2 calls/s = 5,256,000 calls; batches of 8 form
    # from 52,560,000 calls, where busy seconds (5,256,000 s) are past the month already: no second bend
    assert warm.steps(1e8) == pytest.approx([5_256_000, 52_560_000])


# --- 5. APIs as billed --------------------------------------------------------------------------------------

def test_cache_hit_rate_from_the_arrival_rate():
    # 1,000 calls a month: rate x 300 s = 0.114155; 1 - exp(-0.114155) = 0.10788
    assert cache_hit_rate(1_000, 300) == pytest.approx(0.10788, abs=1e-5)
    # 1,000,000 a month: rate x 300 = 114.2: every call finds the prefix
    assert cache_hit_rate(1_000_000, 300) == pytest.approx(1.0)


def test_the_cached_prefix_is_rounded_to_the_providers_step():
    assert cacheable_prefix(1500, OPENAI) == 1408  # 11 x 128
    assert cacheable_prefix(1024, OPENAI) == 1024 and cacheable_prefix(1023, OPENAI) == 0
    assert cacheable_prefix(1500, ANTHROPIC) == 1500


MINI = PerTokenPrice(input_usd_per_mtok=0.15, output_usd_per_mtok=0.6, cached_input_usd_per_mtok=0.075)
GPT5_LIKE = PerTokenPrice(input_usd_per_mtok=1.25, output_usd_per_mtok=10.0, cached_input_usd_per_mtok=0.125)
CLAUDE = PerTokenPrice(input_usd_per_mtok=1.0, output_usd_per_mtok=5.0, cached_input_usd_per_mtok=0.1,
                       cache_write_usd_per_mtok=1.25)


def test_batch_and_cache_on_openai():
    # 2,000 prompt tokens, a 1,500-token prefix cached as 1,408, half the calls hit: 704 read, 704 written
    # (free writes: input rate), 592 fresh: 592 x 0.15 + 704 x 0.075 + 704 x 0.15 + 10 x 0.6 = 253.2 per 1e6
    assert billed_call_cost(2000, 10, 1500, MINI, OPENAI, 0.5) == pytest.approx(253.2e-6)
    # batch, gpt-4o generation: no cache price in a batch, all 2,000 at 0.075, 10 out at 0.3: 153 per 1e6
    assert billed_call_cost(2000, 10, 1500, MINI, OPENAI, 0.5, batch=True) == pytest.approx(153e-6)
    # batch on GPT-5: reads stack: 592 x 0.625 + 1,408 x 0.0625 + 10 x 5 = 370 + 88 + 50 = 508 per 1e6
    assert billed_call_cost(2000, 10, 1500, GPT5_LIKE, GPT5, 1.0, batch=True) == pytest.approx(508e-6)
    # the server said 1,280 were cached: 592 x 0.15 + 1,280 x 0.075 + 128 x 0.15 + 6 = 210 per 1e6
    assert billed_call_cost(2000, 10, 1500, MINI, OPENAI, 0.5, cached_tokens=1280) == pytest.approx(210e-6)


def test_batch_and_cache_on_anthropic():
    # 1,500 cached (no step), 90% hit: 1,350 read, 150 written, 500 fresh:
    # 500 x 1 + 1,350 x 0.1 + 150 x 1.25 + 10 x 5 = 872.5 per 1e6; in a batch every rate halves: 436.25
    assert billed_call_cost(2000, 10, 1500, CLAUDE, ANTHROPIC, 0.9) == pytest.approx(872.5e-6)
    assert billed_call_cost(2000, 10, 1500, CLAUDE, ANTHROPIC, 0.9, batch=True) == pytest.approx(436.25e-6)


def test_catalog_batch_prices_checked_against_the_rule():
    ft_4o = PerTokenPrice(input_usd_per_mtok=3.75, output_usd_per_mtok=15.0, batch_input_usd_per_mtok=2.225,
                          batch_output_usd_per_mtok=12.5)  # half would be 1.875 / 7.5
    assert batch_price_mismatches(ft_4o, OPENAI) == ["batch_input_usd_per_mtok", "batch_output_usd_per_mtok"]
    right = PerTokenPrice(input_usd_per_mtok=3.75, output_usd_per_mtok=15.0, batch_input_usd_per_mtok=1.875,
                          batch_output_usd_per_mtok=7.5)
    assert batch_price_mismatches(right, OPENAI) == []


# --- 6. the cost curves (issue 33) --------------------------------------------------------------------------

def test_the_curves_cross_at_the_break_even():
    routes = {"api": Route(ArmCost(per_call_usd=0.002)),
              "tuned": Route(ArmCost(deployment=BOX, throughput_calls_per_s=2.0), training_usd=438)}
    found = break_even_monthly_calls(routes["api"], routes["tuned"], 12, 1e8)  # 54,750 (see above)
    volumes = curve_volumes(100_000, [found.calls], routes.values())
    assert volumes[0] == pytest.approx(5_475) and volumes[-1] == pytest.approx(1_000_000)  # x0.1 .. x10
    rows = cost_curves(routes, volumes, 12)
    dearer = [r["monthly_calls"] for r in rows if r["horizon_usd"]["tuned"] >= r["horizon_usd"]["api"] - 1e-6]
    assert max(dearer) == pytest.approx(54_750)  # the last volume where the box is not yet cheaper
    at = next(r for r in rows if r["monthly_calls"] == pytest.approx(54_750))
    assert at["horizon_usd"]["api"] == pytest.approx(1314) and at["monthly_usd"]["tuned"] == pytest.approx(73)


def test_the_curves_show_each_replica_step():
    routes = {"tuned": Route(ArmCost(deployment=BOX, throughput_calls_per_s=2.0))}  # 2,628,000 calls a box
    volumes = curve_volumes(3_000_000, [], routes.values())  # 300,000 .. 30,000,000
    rows = {r["monthly_calls"]: r["monthly_usd"]["tuned"] for r in cost_curves(routes, volumes, 12)}
    one, two = 2_628_000, 5_256_000
    assert rows[one] == pytest.approx(73) and rows[one * (1 + 1e-9)] == pytest.approx(146)  # the second box
    assert rows[two] == pytest.approx(146) and rows[two * (1 + 1e-9)] == pytest.approx(219)  # the third
    assert all(v in rows for k in range(1, 12) for v in (k * one,))  # every step up to 28,908,000


# --- 7. the verdict -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("p, diff, base, cand, expected", [
    (math.nan, 0.01, 1000, 800, "not measurable"),
    (0.4, 0.01, 1000, math.inf, "not measurable"),
    (0.5, 0.00, 1000, 800, "fine-tune"),  # cheaper, no worse
    (0.01, 0.03, 1000, 1020, "fine-tune"),  # better, the same cost (within 5%)
    (0.5, 0.00, 1000, 1200, "keep prompting"),  # dearer, no better
    (0.01, -0.03, 1000, 990, "keep prompting"),  # worse, the same cost
    (0.01, -0.03, 1000, 800, "too close to call"),  # cheaper but worse
    (0.01, 0.03, 1000, 1200, "too close to call"),  # better but dearer
    (0.5, 0.00, 1000, 1030, "too close to call"),  # the same on both
])
def test_each_verdict(p, diff, base, cand, expected):
    decision, reason = verdict(p, diff, base, cand, alpha=0.05)
    assert decision == expected
    assert reason.endswith(".") and ". " not in reason  # one sentence


# --- agreement with the monthly break-even, and with a plain scan ---------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pipeline.economics.costing import monthly_break_even  # noqa: E402


@settings(deadline=None, max_examples=60)
@given(usd=st.floats(0.05, 5), usd2=st.floats(0.05, 5), thr=st.floats(0.5, 50), thr2=st.floats(0.5, 50),
       min1=st.integers(0, 2), min2=st.integers(0, 2), fixed=st.floats(0, 5000),
       api=st.one_of(st.just(0.0), st.floats(1e-7, 1e-4)))  # a few 1e-268 a call is a tie here, not in costing
def test_without_fixed_costs_it_is_the_monthly_break_even_and_fixed_costs_only_delay_it(usd, usd2, thr, thr2, min1,
                                                                                      min2, api, fixed):
    base = ArmCost(per_call_usd=api, deployment=Deployment(usd, min1, 0.6), throughput_calls_per_s=thr)
    cand = ArmCost(deployment=Deployment(usd2, min2, 0.6), throughput_calls_per_s=thr2)
    found = break_even_monthly_calls(Route(base), Route(cand), 12, 2e8)
    expected = monthly_break_even(base, cand, 2e8)
    assert (found.calls is None) == (expected is None)
    if expected is not None:
        assert found.calls == pytest.approx(expected, rel=1e-6, abs=1e-3)
    later = break_even_monthly_calls(Route(base), Route(cand, training_usd=fixed), 12, 2e8)
    if later.calls is not None:
        assert found.calls is not None and later.calls >= found.calls * (1 - 1e-9)
    # the ranges tile (0, max] and each one's state is what the totals say inside it
    assert later.ranges[0].start == 0 and later.ranges[-1].end == 2e8
    for a, b in zip(later.ranges, later.ranges[1:]):
        assert a.end == b.start and a.state != b.state
