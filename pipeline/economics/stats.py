"""Statistics over test rows: paired bootstrap intervals, McNemar's exact test, a paired permutation test,
micro-F1, per-label scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import binomtest, bootstrap, permutation_test
from sklearn.metrics import precision_recall_fscore_support

INVALID = -1  # a prediction that parsed to no label


def bootstrap_intervals(n_rows: int, statistic: Callable[[np.ndarray], dict[str, float]], resamples: int = 1000,
                        seed: int = 0, confidence: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile interval of every figure `statistic` returns, over resamples of the test rows.

    `statistic` gets one array of row indices per resample, so every figure it computes (each arm's
    accuracy, their difference) is resampled on the same rows: the intervals are paired.
    """
    keys = list(statistic(np.arange(n_rows)))

    def vector(rows: np.ndarray) -> np.ndarray:
        figures = statistic(rows)
        return np.array([figures[k] for k in keys], dtype=float)

    # A figure that is inf in some resamples (a break-even never reached) makes scipy's standard error
    # subtract inf from inf; the interval itself (scipy's quantiles) comes out inf, not NaN.
    with np.errstate(invalid="ignore"):
        res = bootstrap((np.arange(n_rows),), vector, n_resamples=resamples, vectorized=False,
                        confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return {k: (float(low[i]), float(high[i])) for i, k in enumerate(keys)}


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> float:
    """Two-sided p-value of McNemar's exact test: a binomial test on the rows where only one arm is right."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"outcomes of different lengths: {len(correct_a)} and {len(correct_b)}")
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def micro_f1(counts: np.ndarray) -> np.ndarray | float:
    """F1 of summed (true positive, false positive, false negative) counts, rows on the second-last axis:
    2 TP / (2 TP + FP + FN), 1.0 where there was nothing to find and nothing given."""
    tp, fp, fn = (np.asarray(counts)[..., i].sum(axis=-1) for i in range(3))
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)


def paired_permutation_p(a: np.ndarray, b: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray],
                         resamples: int = 9999, seed: int = 0) -> float:
    """Two-sided p of a paired permutation test of statistic(a) - statistic(b), where row i of `a` and of `b`
    are the two arms' outcomes on the same test row (a value, or a vector such as pair counts).

    Under the null hypothesis the two outcomes of a row are exchangeable, so each permutation swaps a random
    set of rows' pairs (scipy's `permutation_type="samples"`); the rows are passed as indices into the stacked
    outcomes so a row's vector moves as one."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"outcomes of different lengths: {len(a)} and {len(b)}")
    stacked, n = np.concatenate([a, b]), len(a)
    if n == 0 or np.array_equal(a, b):
        return 1.0

    def difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(stacked[x.astype(int)]) - statistic(stacked[y.astype(int)])

    result = permutation_test((np.arange(n), np.arange(n, 2 * n)), difference, permutation_type="samples",
                              vectorized=True, n_resamples=resamples, alternative="two-sided",
                              rng=np.random.default_rng(seed))
    return float(result.pvalue)


def macro_f1_present(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Macro-F1 over the labels present in `references` (label ids >= 0); an invalid prediction (-1) counts as wrong.

    Counted with bincount rather than sklearn's f1_score: the bootstrap calls it a thousand times per arm,
    where sklearn's input checks took ~3 ms a call.
    """
    # A label no evaluated row has would score F1 = 0 and drag the mean down for nothing the arm did.
    predicted, gold = np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64)
    size = int(max(gold.max(initial=-1), predicted.max(initial=-1))) + 1
    gold_count = np.bincount(gold, minlength=size)
    predicted_count = np.bincount(predicted[predicted != INVALID], minlength=size)
    true_positive = np.bincount(gold[predicted == gold], minlength=size)
    present = gold_count > 0
    if not present.any():
        return 0.0
    # F1 = 2 TP / (2 TP + FP + FN), and 2 TP + FP + FN = predicted + gold; gold > 0 for a present label.
    return float(np.mean(2 * true_positive[present] / (predicted_count[present] + gold_count[present])))


def present_labels(predictions: Sequence[int], references: Sequence[int]) -> list[int]:
    """The label ids that occur as gold or as a prediction, sorted (invalid left out)."""
    return sorted((set(references) | set(predictions)) - {INVALID})


def per_label_table(predictions: Sequence[int], references: Sequence[int], labels: list[str]) -> list[dict]:
    """Precision, recall, F1 and support of each label that is gold or predicted on some row, in label order."""
    present = present_labels(predictions, references)
    precision, recall, f1, support = precision_recall_fscore_support(references, predictions, labels=present,
                                                                     zero_division=0)
    return [{"label": labels[label], "precision": round(float(p), 4), "recall": round(float(r), 4),
             "f1": round(float(f), 4), "support": int(s)}
            for label, p, r, f, s in zip(present, precision, recall, f1, support)]
