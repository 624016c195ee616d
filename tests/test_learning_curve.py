"""Tests for the learning curve's pure parts: nested stratified subsets, the power-law fit, rows to match or beat
the baseline (McNemar outcomes worked out by hand), and its chart."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.economics.learning_curve import (PowerLawFit, fit_power_law, rows_for_target, rows_to_beat,
                                               rows_to_match)
from pipeline.report.charts import plot_learning_curve
from pipeline.task.subsets import floored_quotas, nested_stratified_subsets

# A skewed split: 100 rows, one label rare (2 rows).
SKEWED = ["common"] * 60 + ["middle"] * 30 + ["few"] * 8 + ["rare"] * 2
SIZES = [4, 10, 25, 50, 100]


def _counts(labels, rows):
    return {label: sum(labels[i] == label for i in rows) for label in sorted(set(labels))}


def test_subsets_are_nested_and_exactly_sized():
    subsets = nested_stratified_subsets(SKEWED, SIZES, seed=0)
    assert [len(s) for s in subsets] == SIZES
    assert all(len(set(s)) == len(s) and s == sorted(s) for s in subsets)
    for smaller, larger in zip(subsets, subsets[1:]):
        assert set(smaller) <= set(larger)
    assert subsets[-1] == list(range(len(SKEWED)))


def test_every_label_is_present_once_the_size_allows():
    for seed in range(5):
        for subset in nested_stratified_subsets(SKEWED, SIZES, seed):
            assert all(n >= 1 for n in _counts(SKEWED, subset).values())


def test_subsets_follow_the_split_proportions_within_a_row():
    labels = sorted(set(SKEWED))
    share = np.array([SKEWED.count(label) for label in labels]) / len(SKEWED)
    for seed in range(5):
        for size, subset in zip(SIZES, nested_stratified_subsets(SKEWED, SIZES, seed)):
            counts = np.array(list(_counts(SKEWED, subset).values()))
            assert np.all(np.abs(counts - floored_quotas(share, size)) <= 1), (seed, size, counts)
    # at 50 rows the quotas are plainly proportional: 30, 15, 4, 1
    counts = _counts(SKEWED, nested_stratified_subsets(SKEWED, [50], seed=3)[0])
    assert counts == {"common": 30, "middle": 15, "few": 4, "rare": 1}


def test_floored_quotas_lift_a_rare_label_to_one_row_at_the_others_expense():
    # shares 0.6, 0.3, 0.08, 0.02 at 10 rows: rare (0.2) is lifted to 1; of the other 9 rows "few" would get
    # 9 * 0.08 / 0.98 = 0.73, so it is lifted too; the last 8 go 2:1, 16/3 and 8/3
    quotas = floored_quotas(np.array([0.6, 0.3, 0.08, 0.02]), 10)
    assert quotas == pytest.approx([16 / 3, 8 / 3, 1.0, 1.0])
    # at 100 rows nothing needs lifting: plain proportions
    assert floored_quotas(np.array([0.6, 0.3, 0.08, 0.02]), 100) == pytest.approx([60, 30, 8, 2])


def test_subsets_are_seeded():
    assert nested_stratified_subsets(SKEWED, SIZES, 7) == nested_stratified_subsets(SKEWED, SIZES, 7)
    assert nested_stratified_subsets(SKEWED, SIZES, 7) != nested_stratified_subsets(SKEWED, SIZES, 8)


ROWS = np.geomspace(50, 5000, 8)
TRUE = PowerLawFit(a=0.9, b=2.0, c=0.5, rmse=0.0)


def test_power_law_fit_recovers_known_parameters():
    fit = fit_power_law(ROWS, TRUE.predict(ROWS))
    assert (fit.a, fit.b, fit.c) == pytest.approx((0.9, 2.0, 0.5), abs=0.01)
    assert fit.rmse < 1e-4


def test_power_law_fit_recovers_parameters_through_noise():
    noisy = TRUE.predict(ROWS) + np.random.default_rng(0).normal(0, 0.005, len(ROWS))
    fit = fit_power_law(ROWS, noisy)
    assert fit.a == pytest.approx(0.9, abs=0.03)
    assert fit.c == pytest.approx(0.5, abs=0.15)
    assert fit.rmse < 0.01


def test_power_law_fit_needs_three_points():
    assert fit_power_law(ROWS[:2], TRUE.predict(ROWS[:2])) is None
    assert fit_power_law(ROWS[:3], TRUE.predict(ROWS[:3])) is not None


def test_rows_for_target_inverts_the_curve():
    # 0.9 - 2 / sqrt(N) = 0.8  ->  sqrt(N) = 2 / 0.1 = 20  ->  N = 400
    assert rows_for_target(TRUE, 0.8) == pytest.approx(400)
    assert TRUE.predict(rows_for_target(TRUE, 0.85)) == pytest.approx(0.85)
    assert rows_for_target(TRUE, 0.9) == math.inf
    assert rows_for_target(TRUE, 0.95) == math.inf


# Baseline right on the first 100 of 200 test rows (50%).
BASELINE = np.array([1] * 100 + [0] * 100)


def _correct(right_of_baselines: int, right_elsewhere: int, length: int = 200) -> np.ndarray:
    """Right on the first `right_of_baselines` of the baseline's right rows and `right_elsewhere` of its wrong ones."""
    correct = np.zeros(length, dtype=int)
    correct[:right_of_baselines] = 1
    correct[100:100 + right_elsewhere] = 1
    return correct


# 100 rows: 30%, right only where the baseline is: 40 discordant rows all the baseline's, p = 2 * 0.5**40 (worse).
# 300 rows: 52%, 4 discordant rows all its own, p = 2 * 0.5**4 = 0.125 (not significant).
# 1000 rows: 80%, 60 discordant rows all its own, p = 2 * 0.5**60 (better).
POINTS = [(1000, _correct(100, 60)), (100, _correct(60, 0)), (300, _correct(100, 4))]


def test_rows_to_match_and_beat():
    assert rows_to_match(POINTS, BASELINE, alpha=0.05) == 300
    assert rows_to_beat(POINTS, BASELINE, alpha=0.05) == 1000


def test_a_point_below_the_baseline_but_not_significantly_matches():
    # 48%: 4 discordant rows all the baseline's, p = 0.125 >= 0.05
    assert rows_to_match([(100, _correct(60, 0)), (300, _correct(96, 0))], BASELINE, alpha=0.05) == 300
    assert rows_to_match([(300, _correct(96, 0))], BASELINE, alpha=0.2) is None


def test_points_are_compared_on_the_rows_they_share_with_the_baseline():
    # 250 rows long, right on the 50 past the baseline's 200: those rows do not count, so 52% as above
    longer = _correct(100, 4, length=250)
    longer[200:] = 1
    assert rows_to_beat([(300, longer)], BASELINE, alpha=0.05) is None
    assert rows_to_match([(300, longer[:150])], BASELINE, alpha=0.05) == 300  # 100 of 150 right against 100 of 150


def test_no_point_qualifies():
    assert rows_to_match([(100, _correct(60, 0))], BASELINE, alpha=0.05) is None
    assert rows_to_beat(POINTS[1:], BASELINE, alpha=0.05) is None
    assert rows_to_beat([], BASELINE, alpha=0.05) is None


CURVE = [{"rows": n, "accuracy": float(TRUE.predict(n)), "accuracy_ci_low": float(TRUE.predict(n)) - 0.03,
          "accuracy_ci_high": float(TRUE.predict(n)) + 0.03} for n in (100, 300, 1000, 3000)]
PROMPTED = {"name": "prompted model", "accuracy": 0.8, "accuracy_ci_low": 0.77, "accuracy_ci_high": 0.83}


@pytest.mark.parametrize("baseline, fit", [(None, None), (PROMPTED, None), (PROMPTED, TRUE)])
def test_learning_curve_chart_is_written(tmp_path, baseline, fit):
    path = tmp_path / "curve.png"
    plot_learning_curve(CURVE, baseline, "learning curve", path, fit=fit)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 1000
