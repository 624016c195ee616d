"""The compare pair over the horizon as the run computes it (economics.decision), checked by hand: an API arm
against a one-box self-hosted arm, the replica steps of a box that needs more than one, the verdict and the
sentence the report leads with."""

import json
import math

import numpy as np
import pytest
import yaml

from conftest import ROOT, roi
from pipeline.economics.decision import ArmInputs, compare
from pipeline.economics.figures import ArmRows
from pipeline.economics.prices import PerHourPrice, PerTokenPrice, PricingConfig, StatsConfig
from pipeline.economics.routes import Ownership
from pipeline.report.summary import Summary, verdict

# People, labels and evaluation cost nothing here, so the hand sums are about running costs alone.
PRICING = PricingConfig(monthly_calls=100_000, horizon_months=12, people={"usd_per_hour": 0.0}, error_cost_usd=0.0)
STATS = StatsConfig(resamples=50)
API = PerTokenPrice(input_usd_per_mtok=1.0, output_usd_per_mtok=0.0)  # 1,000 prompt tokens: $0.001 a call
BOX = PerHourPrice(usd_per_hour=0.10, target_utilisation=1.0)  # $73 a month (730 h)


def _metrics(accuracy: float, throughput: float) -> dict[str, float]:
    return {"accuracy": accuracy, "prompt_tokens_mean": 1000.0, "completion_tokens_mean": 0.0, "prefix_tokens": 0.0,
            "throughput_calls_per_s": throughput, "latency_p95_ms": 100.0, "batch_size": 1.0,
            "fixed_cost_usd": 0.0, "train_time_s": 0.0}


def _rows(correct: list[bool]) -> ArmRows:
    n = len(correct)
    return ArmRows(np.array(correct), np.zeros(n, int), np.zeros(n, int), np.full(n, 1000.0), np.zeros(n))


def _decision(box_throughput: float, correct_api: list[bool], correct_box: list[bool]):
    arms = {"api": ArmInputs("api", API, _metrics(np.mean(correct_api), 0.0), Ownership("prompt")),
            "box": ArmInputs("box", BOX, _metrics(np.mean(correct_box), box_throughput), Ownership("finetuned"))}
    return compare("api", "box", None, arms, {"api": _rows(correct_api), "box": _rows(correct_box)}, PRICING, STATS,
                   {})


def test_an_api_against_one_box_crosses_where_the_hand_sum_says():
    """Over 12 months the API costs 12 x $0.001 x V and one box 12 x $73 = $876 while it has room (a box serves
    100 calls/s at the peak, 3x the average: 87.6M calls a month). They cross at V = 876 / 0.012 = 73,000."""
    decision = _decision(100.0, [True] * 20, [True] * 20)
    p = decision.parent
    assert p["break_even_monthly_calls"] == pytest.approx(73_000)
    assert p["tco_baseline_usd"] == pytest.approx(1200.0) and p["tco_candidate_usd"] == pytest.approx(876.0)
    assert p["payback_months"] == 0  # never the dearer route at 100,000 calls a month: both one-offs are $0
    curves = decision.curves
    api, box = (next(r for r in curves["routes"] if r["name"] == n) for n in ("api", "box"))
    volumes = curves["volumes"]
    # In cost_curves.json, the box is dearer below the crossing and cheaper above it, and the crossing is marked.
    for v, a, b in zip(volumes, api["horizon_usd"], box["horizon_usd"]):
        assert (b < a) == (v > 73_000 * (1 + 1e-9)) or math.isclose(v, 73_000)
    assert 73_000 in [pytest.approx(v) for v in volumes]
    assert [m["volume"] for m in curves["break_evens"] if m["key"] == "break_even_monthly_calls"] == [
        pytest.approx(73_000)]
    assert decision.ranges[0]["state"] == "dearer" and decision.ranges[-1]["state"] == "cheaper"
    assert decision.ranges[-1]["start"] == pytest.approx(73_000)


def test_a_box_that_needs_a_second_replica_steps_up_at_its_capacity():
    """At 1 call/s a box serves 1 x 730 x 3600 / 3 = 876,000 calls a month at the peak: $73 a month up to there,
    $146 just past it (and the grid holds both sides of the step)."""
    decision = _decision(1.0, [True] * 20, [True] * 20)
    box = next(r for r in decision.curves["routes"] if r["name"] == "box")
    by_volume = dict(zip(decision.curves["volumes"], box["monthly_usd"]))
    step = 876_000.0
    at = min(by_volume, key=lambda v: abs(v - step))
    after = min((v for v in by_volume if v > step), default=None)
    assert at == pytest.approx(step) and by_volume[at] == pytest.approx(73.0)
    assert after is not None and after < step * 1.001 and by_volume[after] == pytest.approx(146.0)
    # The grid spans a tenth of the lowest anchor to ten times the highest (the crossing at 73,000, the volume).
    assert min(decision.curves["volumes"]) == pytest.approx(7_300) and max(decision.curves["volumes"]) == pytest.approx(1e6)


def test_the_verdict_weighs_accuracy_and_cost():
    same = _decision(100.0, [True] * 20, [True] * 20)
    assert same.verdict[0] == "fine-tune"  # cheaper over the horizon, and no worse
    # The box is cheaper but wrong on 15 of 20 rows the API answers right: significantly worse.
    worse = _decision(100.0, [True] * 20, [True] * 5 + [False] * 15)
    assert worse.parent["mcnemar_p"] < 0.05
    assert worse.verdict[0] == "too close to call" and "error cost" in worse.verdict[1]


def test_the_report_leads_with_the_verdict_and_never_says_both():
    decision = _decision(100.0, [True] * 20, [True] * 20)
    arm = {"accuracy": 1.0, "fixed_cost_usd": 0.0}
    summary = Summary("e", "t", "m", 20, {"api": arm, "box": arm}, decision.parent, "api", "box", 100_000,
                      verdict=decision.verdict, horizon_months=12)
    text = verdict(summary)
    assert text.startswith("Fine-tune. The fine-tune")
    assert "from 73,001 calls/month on" in text and "never the dearer route" in text  # tied at 73,000 itself
    assert not ("never" in text.replace("never the dearer", "") and "recovered after" in text)


@pytest.mark.parametrize("change, message", [
    ({"pricing": {"people": {"prompt_hours": -1}}}, "pricing.people.prompt_hours: must be at least 0 (got -1)"),
    ({"pricing": {"horizon_months": 0}}, "pricing.horizon_months: must be greater than 0 (got 0)"),
    ({"pricing": {"arms": {"naive": {"usd_per_hour": 1, "billing": "spot"}}}},
     "pricing.arms.naive.billing: 'spot' is not allowed (expected 'always_on' or 'per_second')"),
    ({"finetune": {"retrain_every_months": 18}},
     "arms (finetuned).finetune.retrain_every_months: 18 is longer than pricing.horizon_months (12)"),
    ({"report": {"price_what_if": ["gpt-4o-mni"]}}, "report.price_what_if[0]: unknown model 'gpt-4o-mni'"),
])
def test_bad_cost_keys_are_one_line_before_any_model_loads(tmp_path, change, message):
    config = yaml.safe_load((ROOT / "experiments" / "default.yaml").read_text())
    for section, values in change.items():
        config[section] = {**config.get(section, {}), **values}
    config["task"]["path"] = str(ROOT / "datasets" / "support_tickets")
    path = tmp_path / "costs.yaml"
    path.write_text(yaml.safe_dump(config))
    result = roi("run", str(path), f"output_dir={tmp_path / 'runs'}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()
    json.dumps(lines)  # one plain line
