"""The learning curve's math: a power-law fit of accuracy against training rows, the rows it takes to reach a
target, and the fewest rows at which the fine-tune matches or beats the baseline on the same test rows."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from pipeline.economics.stats import mcnemar_exact


@dataclass(frozen=True)
class PowerLawFit:
    """accuracy = a - b * rows**(-c): `a` the ceiling more rows approach, `rmse` the fit's error on its points."""

    a: float
    b: float
    c: float
    rmse: float

    def predict(self, rows: float | np.ndarray) -> float | np.ndarray:
        """The fitted accuracy at `rows` training rows (a number for a number, an array for an array)."""
        return power_law(np.asarray(rows, dtype=float), self.a, self.b, self.c)


def power_law(rows: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """a - b * rows**(-c), in the argument order scipy's curve_fit passes."""
    return a - b * rows ** (-c)


def fit_power_law(rows: Sequence[float], accuracy: Sequence[float]) -> PowerLawFit | None:
    """The least-squares power law through (rows, accuracy), with 0 <= a <= 1, b >= 0, c > 0; None with fewer than
    3 points or when the fit does not converge."""
    x, y = np.asarray(rows, dtype=float), np.asarray(accuracy, dtype=float)
    if len(x) < 3:
        return None
    # Start from the best accuracy seen as the ceiling and c = 0.5, with b putting the curve through the first point.
    ceiling, exponent = float(np.clip(y.max(), 0.0, 1.0)), 0.5
    start = [ceiling, max(ceiling - float(y[np.argmin(x)]), 0.0) * float(x.min()) ** exponent, exponent]
    try:
        with warnings.catch_warnings():
            # With exactly 3 points scipy cannot estimate the covariance and warns; the covariance is not used.
            warnings.simplefilter("ignore", OptimizeWarning)
            (a, b, c), _ = curve_fit(power_law, x, y, p0=start, bounds=([0.0, 0.0, 1e-9], [1.0, np.inf, np.inf]))
    except (RuntimeError, OptimizeWarning, ValueError):
        return None
    if not np.all(np.isfinite([a, b, c])):
        return None
    rmse = float(np.sqrt(np.mean((power_law(x, a, b, c) - y) ** 2)))
    return PowerLawFit(float(a), float(b), float(c), rmse)


def rows_for_target(fit: PowerLawFit, target: float) -> float:
    """The training rows at which the fitted curve reaches `target` accuracy: (b / (a - target)) ** (1 / c);
    math.inf when target >= a (the curve never reaches it)."""
    if target >= fit.a:
        return math.inf
    return (fit.b / (fit.a - target)) ** (1.0 / fit.c)


def rows_to_match(points: Sequence[tuple[int, np.ndarray]], baseline_correct: np.ndarray,
                  alpha: float) -> int | None:
    """The fewest training rows whose point is not significantly worse than the baseline: its accuracy is at
    least the baseline's, or the paired exact McNemar test gives p >= alpha. None when no point qualifies.

    `points` are (training rows, 0/1 correct per test row); each is compared with the baseline on the test rows
    both have (their common prefix)."""
    for rows, accuracy, baseline, p in paired_outcomes(points, baseline_correct):
        if accuracy >= baseline or p >= alpha:
            return rows
    return None


def rows_to_beat(points: Sequence[tuple[int, np.ndarray]], baseline_correct: np.ndarray,
                 alpha: float) -> int | None:
    """The fewest training rows whose point is significantly better than the baseline: higher accuracy and a
    paired exact McNemar p < alpha, on the test rows both have. None when no point qualifies."""
    for rows, accuracy, baseline, p in paired_outcomes(points, baseline_correct):
        if accuracy > baseline and p < alpha:
            return rows
    return None


def paired_outcomes(points: Sequence[tuple[int, np.ndarray]],
                    baseline_correct: np.ndarray) -> list[tuple[int, float, float, float]]:
    """(training rows, accuracy, baseline's accuracy, McNemar p) per point, fewest rows first, each on the test
    rows the point and the baseline share; a point sharing none is left out."""
    outcomes = []
    for rows, correct in sorted(points, key=lambda point: point[0]):
        shared = min(len(correct), len(baseline_correct))
        if shared == 0:  # nothing to compare on: no evidence either way
            continue
        mine, theirs = np.asarray(correct[:shared], dtype=bool), np.asarray(baseline_correct[:shared], dtype=bool)
        outcomes.append((int(rows), float(mine.mean()), float(theirs.mean()), mcnemar_exact(mine, theirs)))
    return outcomes
