"""Tests for pipeline.measure.sequential: confidence sequences stay valid under optional stopping."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.measure.sequential import (SequentialRule, confidence_sequence,
                                         paired_difference_sequence, round_sizes, stop_reason)

STREAMS = 2000
LIMIT = 1000
RULE = SequentialRule(min_rows=50, step_rows=32, half_width=0.05, alpha=0.05)
ACCURACIES = [0.05, 0.3, 0.5, 0.85]


def _streams(accuracy: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((STREAMS, LIMIT)) < accuracy).astype(float)


def _wilson(x: np.ndarray, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-n 95% Wilson interval after each row (rows along the last axis)."""
    n = np.arange(1, x.shape[-1] + 1)
    p = np.cumsum(x, axis=-1) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _covered_at(lo, hi, stop, truth) -> np.ndarray:
    rows = np.arange(len(stop))
    return (lo[rows, stop] <= truth) & (truth <= hi[rows, stop])


@pytest.mark.parametrize("seed, accuracy", list(enumerate(ACCURACIES)))
def test_cs_covers_at_the_rules_stopping_time_and_fixed_n_does_not_under_peeking(seed, accuracy):
    x = _streams(accuracy, seed)
    checks = np.array(round_sizes(LIMIT, RULE)) - 1  # row indices of the round boundaries
    lo, hi = confidence_sequence(x, RULE.alpha)

    # the rule: stop at the first boundary where the half-width is <= 0.05, else at the limit
    narrow = (hi[:, checks] - lo[:, checks]) / 2 <= RULE.half_width
    stop = checks[np.where(narrow.any(axis=1), narrow.argmax(axis=1), len(checks) - 1)]
    assert _covered_at(lo, hi, stop, accuracy).mean() >= 0.95

    # the worst stopping time: stop the first round the interval misses the truth, else at the
    # limit. Coverage there is P(no round misses), which a CS keeps >= 1 - alpha ...
    misses = (lo[:, checks] > accuracy) | (hi[:, checks] < accuracy)
    assert 1 - misses.any(axis=1).mean() >= 0.95

    # ... and a fixed-n 95% interval read at that stopping time does not.
    w_lo, w_hi = _wilson(x)
    w_miss = (w_lo[:, checks] > accuracy) | (w_hi[:, checks] < accuracy)
    w_stop = checks[np.where(w_miss.any(axis=1), w_miss.argmax(axis=1), len(checks) - 1)]
    assert _covered_at(w_lo, w_hi, w_stop, accuracy).mean() < 0.90
    # (at a fixed n it is fine: the same streams read at the limit only)
    assert _covered_at(w_lo, w_hi, np.full(STREAMS, LIMIT - 1), accuracy).mean() >= 0.93


def test_paired_cs_rarely_decides_between_equal_arms():
    rng = np.random.default_rng(10)
    a = (rng.random((STREAMS, LIMIT)) < 0.7).astype(float)
    b = (rng.random((STREAMS, LIMIT)) < 0.7).astype(float)
    lo, hi = paired_difference_sequence(a, b, 0.05)
    checks = np.array(round_sizes(LIMIT, RULE)) - 1
    decided = (lo[:, checks] > 0) | (hi[:, checks] < 0)
    assert decided.any(axis=1).mean() <= 0.05


def test_bounds_contain_running_mean_never_widen_and_stay_in_unit_interval():
    x = (np.random.default_rng(3).random(500) < 0.3).astype(float)
    lo, hi = confidence_sequence(x, 0.05)
    running = np.cumsum(x) / np.arange(1, 501)
    assert lo.shape == hi.shape == (500,)
    assert np.all(lo <= running) and np.all(running <= hi)
    assert np.all(np.diff(lo) >= 0) and np.all(np.diff(hi) <= 0)
    assert np.all(lo >= 0) and np.all(hi <= 1)
    assert hi[-1] - lo[-1] < hi[49] - lo[49] < 1  # and they do shrink


def test_continuous_scores_and_bad_input():
    x = np.random.default_rng(4).beta(5, 2, size=300)  # chrF-like scores in [0, 1]
    lo, hi = confidence_sequence(x, 0.05)
    assert lo[-1] <= x.mean() <= hi[-1]
    with pytest.raises(ValueError):
        confidence_sequence([0.5, 1.2], 0.05)
    with pytest.raises(ValueError):
        confidence_sequence([0.5], 0.0)
    assert confidence_sequence([], 0.05)[0].shape == (0,)


def test_paired_sequence_of_identical_arms_contains_zero():
    a = (np.random.default_rng(5).random(200) < 0.6).astype(float)
    lo, hi = paired_difference_sequence(a, a, 0.05)
    assert np.all(lo <= 0) and np.all(hi >= 0)
    assert np.all(lo >= -1) and np.all(hi <= 1)


def test_arms_differing_on_every_row_are_decided():
    a, b = np.ones(60), np.zeros(60)
    lo, hi = paired_difference_sequence(a, b, 0.05)
    assert lo[-1] > 0 and hi[-1] == pytest.approx(1.0)
    assert stop_reason(a, RULE, paired_with=b) == "decided"
    # the other way round, the interval is below 0
    assert paired_difference_sequence(b, a, 0.05)[1][-1] < 0
    assert stop_reason(b, RULE, paired_with=a) == "decided"


def test_paired_with_uses_the_common_prefix_only_once_it_has_min_rows():
    a, b = np.ones(60), np.zeros(40)
    assert stop_reason(a, RULE, paired_with=b) is None  # 40-row prefix < min_rows 50
    assert stop_reason(a, RULE, paired_with=np.zeros(55)) == "decided"


def test_interval_reason_for_a_long_constant_stream():
    assert stop_reason(np.ones(400), RULE) == "interval"
    assert stop_reason(np.zeros(400), RULE) == "interval"
    assert stop_reason(np.ones(50), RULE) is None  # half-width still ~0.075 at row 50
    x = (np.random.default_rng(6).random(300) < 0.5).astype(float)
    assert stop_reason(x, RULE) is None
    assert stop_reason(x, RULE, paired_with=x) is None


def test_round_sizes():
    rule = SequentialRule(min_rows=50, step_rows=32, half_width=0.05, alpha=0.05)
    assert round_sizes(100, rule) == [50, 82, 100]
    assert round_sizes(114, rule) == [50, 82, 114]
    assert round_sizes(50, rule) == [50]
    assert round_sizes(30, rule) == [30]
    assert round_sizes(0, rule) == []


def test_rule_checks_its_values():
    with pytest.raises(ValueError):
        SequentialRule(min_rows=0, step_rows=32, half_width=0.05, alpha=0.05)
    with pytest.raises(ValueError):
        SequentialRule(min_rows=50, step_rows=32, half_width=0.05, alpha=1.5)
