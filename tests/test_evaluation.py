import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.measure.kinds import Classification
from pipeline.measure.scoring import INVALID, call_metrics, latency_stats, parse_label, score, search_label

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


def test_labels_that_end_in_punctuation_parse_as_written_and_wrapped():
    # BANKING77 has "reverted_card_payment?" beside "card_payment_fee_charged".
    labels = ["reverted_card_payment?", "card_payment_fee_charged", "why_verify_identity"]
    assert parse_label("reverted_card_payment?", labels) == 0
    assert parse_label('"Reverted card payment?"', labels) == 0
    assert parse_label("card_payment_fee_charged.", labels) == 1
    assert parse_label("reverted_card_payment", labels) == INVALID  # not a label: the "?" is part of the name


@given(st.sampled_from(["reverted_card_payment?", "top_up?", "why_verify_identity"]),
       st.sampled_from(["", '"', "**", "`"]))
def test_every_punctuated_label_round_trips(name, wrap):
    labels = ["reverted_card_payment?", "top_up?", "why_verify_identity", "top_up"]
    assert parse_label(wrap + name + wrap, labels) == labels.index(name)


def test_very_long_and_unicode_outputs_are_invalid_not_errors():
    assert parse_label("ü" * 100_000, LABELS) == INVALID
    assert parse_label("账单", LABELS) == INVALID


def test_score_counts_invalid_as_wrong():
    metrics = score([0, 1, INVALID, 3], [0, 1, 2, 2], n_labels=4)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["invalid_rate"] == pytest.approx(0.25)
    # over the gold labels present (0, 1, 2): F1 0 -> 1, 1 -> 1, 2 -> 0 (two misses); mean 2/3.
    # Label 3 never occurs in these rows: it no longer scores 0 and pulls the mean down to 0.5.
    assert metrics["macro_f1"] == pytest.approx(2 / 3)


def test_latency_stats_percentiles_and_cv():
    stats = latency_stats([10.0] * 98 + [100.0, 1000.0])
    assert stats["latency_p50_ms"] == 10.0
    assert 10.0 < stats["latency_p99_ms"] <= 1000.0
    assert stats["latency_p95_ms"] == 10.0
    assert stats["latency_cv"] > 1
    assert latency_stats([5.0, 5.0])["latency_cv"] == 0.0
    assert not math.isnan(latency_stats([1.0])["latency_p99_ms"])
    assert "latency_repeat_cv" not in latency_stats([5.0], pass_p50_ms=[5.0])


def test_latency_repeat_cv_is_the_spread_of_the_passes():
    stats = latency_stats([10.0, 12.0], pass_p50_ms=[9.0, 11.0])
    assert stats["latency_repeat_cv"] == pytest.approx(0.1)  # std 1 / mean 10
    assert latency_stats([1.0], pass_p50_ms=[4.0, 4.0, 4.0])["latency_repeat_cv"] == 0.0


@pytest.mark.parametrize("output, expected", [
    ("billing", 0),
    ('This message fits the category of "billing".', 0),
    ("The answer is Account Access, because the user is locked out", 1),
    ("category: data-privacy", 2),
    ("billing and refunds", 0),
    ("It is either billing or bug_report", INVALID),      # two labels named: it did not choose
    ("This message fits the category of \"B", INVALID),  # cut before the label: nothing named
    ("billings are weird", INVALID),                     # whole phrases only
    ("rebilling", INVALID),
    ("", INVALID),
])
def test_search_reads_the_one_label_an_answer_names(output, expected):
    assert search_label(output, LABELS) == expected


def test_search_prefers_the_longest_label_at_a_position():
    labels = ["card", "card_arrival", "card arrival delay?", "refund"]
    assert search_label("Your card arrival is late", labels) == 1     # not "card"
    assert search_label("card arrival delay? yes", labels) == 2       # labels ending in punctuation too
    assert search_label("my card, then a refund", labels) == INVALID  # two different labels
    assert search_label("card card", labels) == 0                     # the same label twice is one answer


@given(st.text())
def test_search_never_crashes_and_agrees_with_exact_on_bare_labels(output):
    assert search_label(output, LABELS) in {INVALID, *range(len(LABELS))}
    for i, label in enumerate(LABELS):
        assert search_label(label, LABELS) == parse_label(label, LABELS) == i


def test_accuracy_under_both_parsers_is_logged_beside_the_configured_one():
    from pipeline.backends.base import Call
    from pipeline.measure.timing import Measurement

    outputs = ["billing", "The category is bug_report.", "no idea", "data privacy"]
    refs = [0, 3, 1, 2]
    calls = [Call(o, 10, 2, 5.0) for o in outputs]
    kind = Classification(LABELS, "search")
    m = kind.metrics([kind.score(o, LABELS[r]) for o, r in zip(outputs, refs)], [LABELS[r] for r in refs], outputs)
    m.update(call_metrics(Measurement(calls, 1.0, [5.0])))
    assert m["accuracy"] == m["accuracy_search"] == 0.75  # billing, bug_report, data privacy
    assert m["accuracy_exact"] == 0.5                     # the sentence does not count as an exact answer
    assert m["invalid_rate"] == 0.25 and m["failed_rate"] == 0.0


def test_labels_the_parsers_cannot_tell_apart_are_refused_hyphens_included():
    from pipeline.task.checks import check_label_set
    from pipeline.task.types import DataError

    for a, b in (("billing", "BILLING"), ("card_payment", "card payment"), ("e-mail", "email")):
        with pytest.raises(DataError, match="look the same to the answer parser"):
            check_label_set("labels.json", [a, "refund", b], ["entry 1", "entry 2", "entry 3"])
        # ...because both parsers read either spelling as the first label
        assert parse_label(b, [a, "refund"]) == 0 and search_label(b, [a, "refund"]) == 0
