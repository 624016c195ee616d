import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.evaluation import INVALID, latency_stats, parse_label, score

LABELS = ["billing", "account_access", "data_privacy", "bug_report"]


@pytest.mark.parametrize(
    "output, expected",
    [
        ("billing", 0),
        ("Billing", 0),
        ("  BILLING  \nbecause you were charged", 0),
        ("account access", 1),
        ("Account_Access", 1),
        ("accountaccess", 1),
        ("data privacy.", 2),
        ('"bug_report"', 3),
        ("**bug_report**", 3),
        ("\n\nbilling", 0),  # the first non-empty line is the answer
        ("", INVALID),
        ("   \n  ", INVALID),
        ("billing and refunds", INVALID),
        ("The answer is billing", INVALID),
        ("refund", INVALID),
        ("bill ing", 0),  # spaces are ignored, as the contract says
    ],
)
def test_parse_label(output, expected):
    assert parse_label(output, LABELS) == expected


@given(st.text())
def test_parse_never_crashes_and_returns_a_label_or_invalid(output):
    assert parse_label(output, LABELS) in {INVALID, *range(len(LABELS))}


@given(st.sampled_from(range(len(LABELS))), st.sampled_from(["upper", "title", "spaces", "plain"]),
       st.text(alphabet=" \t", max_size=3))
def test_every_label_spelling_round_trips(index, style, padding):
    name = LABELS[index]
    text = {"upper": name.upper(), "title": name.title(), "spaces": name.replace("_", " "), "plain": name}[style]
    assert parse_label(padding + text + padding + "\nextra words", LABELS) == index


def test_very_long_and_unicode_outputs_are_invalid_not_errors():
    assert parse_label("ü" * 100_000, LABELS) == INVALID
    assert parse_label("账单", LABELS) == INVALID


def test_score_counts_invalid_as_wrong():
    metrics = score([0, 1, INVALID, 3], [0, 1, 2, 2], n_labels=4)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["invalid_rate"] == pytest.approx(0.25)
    # per-label F1: 0 -> 1, 1 -> 1, 2 -> 0 (two misses), 3 -> 0 (one false positive); mean 0.5
    assert metrics["macro_f1"] == pytest.approx(0.5)


def test_latency_stats_percentiles_and_cv():
    stats = latency_stats([10.0] * 98 + [100.0, 1000.0])
    assert stats["latency_p50_ms"] == 10.0
    assert 10.0 < stats["latency_p99_ms"] <= 1000.0
    assert stats["latency_p95_ms"] == 10.0
    assert stats["latency_cv"] > 1
    assert latency_stats([5.0, 5.0])["latency_cv"] == 0.0
    assert not math.isnan(latency_stats([1.0])["latency_p99_ms"])
