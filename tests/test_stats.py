"""Tests for pipeline.economics.stats; expected numbers are worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.report.charts import confusion_matrix_png
from pipeline.economics.stats import (bootstrap_intervals, macro_f1_present, mcnemar_exact,
                            per_label_table)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # IHDR width follows the 8-byte magic and 8-byte chunk head


def test_accuracy_interval_has_the_normal_width():
    correct = np.array([1, 0] * 200)  # 400 rows, accuracy 0.5

    intervals = bootstrap_intervals(400, lambda rows: {"accuracy": correct[rows].mean(),
                                                       "error": 1 - correct[rows].mean()})

    low, high = intervals["accuracy"]
    assert low < 0.5 < high
    # normal approximation: 2 * 1.96 * sqrt(0.5 * 0.5 / 400) = 2 * 1.96 * 0.025 = 0.098
    assert high - low == pytest.approx(0.098, abs=0.02)
    # each key gets its own figure's interval: error = 1 - accuracy, so its ends are accuracy's, mirrored
    assert intervals["error"] == pytest.approx((1 - high, 1 - low))


def test_arms_are_resampled_on_the_same_rows():
    a = np.array([1, 0, 1, 1, 0] * 20)
    b = a.copy()

    intervals = bootstrap_intervals(100, lambda rows: {"acc_a": a[rows].mean(), "acc_b": b[rows].mean()})

    # were the arms resampled independently, the two intervals would almost surely differ
    assert intervals["acc_a"] == intervals["acc_b"]


def test_a_consistent_difference_has_an_interval_above_zero():
    a = np.array([1] * 60 + [0] * 40)
    b = a.copy()
    b[:10] = 0  # a right and b wrong on exactly rows 0-9; the same outcome on the other 90

    low, high = bootstrap_intervals(100, lambda rows: {"diff": a[rows].mean() - b[rows].mean()})["diff"]

    # diff = (draws landing on rows 0-9) / 100 ~ Binomial(100, 0.1) / 100, whose 2.5% and 97.5% quantiles are
    # 5 and 16 (cdf(4) = 0.024, cdf(5) = 0.058; cdf(15) = 0.960, cdf(16) = 0.979): about (0.05, 0.16).
    # A resample has diff 0 with probability 0.9**100 = 2.7e-5, nowhere near the 2.5% tail: the low end is > 0.
    assert 0 < low < 0.1 < high
    assert low == pytest.approx(0.05, abs=0.015) and high == pytest.approx(0.16, abs=0.015)


def test_the_same_seed_gives_the_same_intervals():
    correct = np.array([1, 1, 0] * 50)

    def statistic(rows):
        return {"accuracy": correct[rows].mean()}

    assert bootstrap_intervals(150, statistic, seed=7) == bootstrap_intervals(150, statistic, seed=7)
    assert bootstrap_intervals(150, statistic, seed=7) != bootstrap_intervals(150, statistic, seed=8)


@pytest.mark.filterwarnings("error")
def test_an_infinite_figure_gives_an_infinite_end_not_nan():
    correct = np.array([1, 0] * 50)  # 100 rows, accuracy 0.5

    def statistic(rows):
        acc = correct[rows].mean()
        # break-even calls: never (inf) once accuracy falls to 0.45
        return {"break_even": 1 / (acc - 0.45) if acc > 0.45 else math.inf, "never": math.inf}

    intervals = bootstrap_intervals(100, statistic)

    # P(accuracy <= 0.45) = P(Binomial(100, 0.5) <= 45) ~ 0.18, far more than the 2.5% upper tail: high is inf.
    # The low end comes from the top 2.5% of accuracies, ~0.5 + 1.96 * 0.05 = 0.598: 1 / (0.598 - 0.45) ~ 6.8.
    low, high = intervals["break_even"]
    assert high == math.inf
    assert 4 < low < 12
    assert intervals["never"] == (math.inf, math.inf)


@pytest.mark.filterwarnings("error")
def test_a_constant_figure_gives_a_point_interval():
    intervals = bootstrap_intervals(50, lambda rows: {"rows": len(rows), "price": 0.3})

    assert intervals == {"rows": (50.0, 50.0), "price": (0.3, 0.3)}


def test_mcnemar_counts_only_discordant_rows():
    concordant = [True] * 20 + [False] * 7  # rows where both arms agree change nothing

    # b = 0, c = 5: two-sided p = P(X=0) + P(X=5) = 2 * 0.5**5 = 0.0625
    assert mcnemar_exact([False] * 5 + concordant, [True] * 5 + concordant) == pytest.approx(0.0625)
    # b = 1, c = 9: p = 2 * (C(10,0) + C(10,1)) / 2**10 = 2 * 11 / 1024 = 0.021484375
    a = [True] + [False] * 9 + concordant
    b = [False] + [True] * 9 + concordant
    assert mcnemar_exact(a, b) == pytest.approx(0.021484375)
    assert mcnemar_exact(b, a) == pytest.approx(0.021484375)  # two-sided: the order of the arms does not matter


def test_mcnemar_without_disagreement_is_one():
    assert mcnemar_exact([True, False, True], [True, False, True]) == 1.0


def test_mcnemar_rejects_unpaired_outcomes():
    with pytest.raises(ValueError):
        mcnemar_exact([True, False], [True])


def test_macro_f1_ignores_labels_no_row_has():
    references = [0, 0, 1, 1, 2, 2]
    predictions = [0, 1, 1, 3, 2, -1]  # label 3 is never gold; -1 is an invalid output

    # label 0: tp 1, fp 0, fn 1 -> P 1, R 1/2, F1 2/3
    # label 1: tp 1, fp 1 (row 1), fn 1 (row 3) -> P 1/2, R 1/2, F1 1/2
    # label 2: tp 1, fp 0, fn 1 (row 5, invalid) -> P 1, R 1/2, F1 2/3
    # macro over {0, 1, 2}: (2/3 + 1/2 + 2/3) / 3 = 11/18; counting label 3 (F1 0) would give 11/24
    assert macro_f1_present(predictions, references) == pytest.approx(11 / 18)


def test_macro_f1_matches_sklearn_on_random_outcomes():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    for _ in range(50):
        n, labels = int(rng.integers(1, 60)), int(rng.integers(1, 12))
        references = rng.integers(0, labels, n)
        predictions = np.where(rng.random(n) < 0.2, -1, rng.integers(0, labels + 2, n))  # invalid and unseen labels
        expected = f1_score(references, predictions, labels=sorted(set(references.tolist())), average="macro",
                            zero_division=0)
        assert macro_f1_present(predictions, references) == pytest.approx(expected, abs=1e-12)


def test_per_label_table_lists_gold_or_predicted_labels():
    references = [0, 0, 1, 1, 2, 2]
    predictions = [0, 1, 1, 3, 2, -1]

    table = per_label_table(predictions, references, ["a", "b", "c", "d", "e"])

    # same counts as above; "d" is predicted once and never gold: P 0/1, R 0 (no gold rows), support 0.
    # "e" is neither gold nor predicted, and -1 is not a label: no rows for them.
    assert table == [
        {"label": "a", "precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2},
        {"label": "b", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        {"label": "c", "precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2},
        {"label": "d", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
    ]
    assert all(type(row["support"]) is int for row in table)


def test_confusion_matrix_png_with_an_invalid_prediction(tmp_path):
    path = tmp_path / "confusion.png"

    confusion_matrix_png([0, 1, 1, 3, 2, -1], [0, 0, 1, 1, 2, 2], ["a", "b", "c", "d", "e"], path, "arm")

    assert path.read_bytes().startswith(PNG_MAGIC)


def test_confusion_matrix_png_grows_with_the_label_count(tmp_path):
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    labels = [f"label_{i}" for i in range(80)]
    references = list(range(80))

    confusion_matrix_png([0, 1, 2], [0, 1, 2], labels, small, "3 labels")
    confusion_matrix_png(references[1:] + [-1], references, labels, large, "80 labels")

    assert large.read_bytes().startswith(PNG_MAGIC)
    assert _png_width(large) > 2 * _png_width(small)
