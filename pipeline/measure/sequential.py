"""Always-valid confidence intervals (confidence sequences) for evaluating arms in rounds.

The bound is the predictable plug-in empirical-Bernstein confidence sequence (PrPl-EB CS) of
Waudby-Smith, I. and Ramdas, A. (2023), "Estimating means of bounded random variables by
betting", JRSS-B 86(1), Theorem 2 (arXiv:2010.09686). For X_1, X_2, ... in [0, 1] with
conditional mean mu, and t = 1, 2, ...:

    mu_hat_t   = (1/2 + sum_{i<=t} X_i) / (t + 1),              mu_hat_0 = 1/2
    sigma2_t   = (1/4 + sum_{i<=t} (X_i - mu_hat_i)^2) / (t + 1), sigma2_0 = 1/4
    lambda_t   = min(sqrt(2 log(2/alpha) / (sigma2_{t-1} t log(1 + t))), 1/2)
    v_t        = 4 (X_t - mu_hat_{t-1})^2
    psi_E(l)   = (-log(1 - l) - l) / 4
    C_t        = sum λ_i X_i / sum λ_i  ±  (log(2/alpha) + sum v_i psi_E(λ_i)) / sum λ_i

P(exists t: mu not in C_t) <= alpha, so C_tau covers mu at any stopping time tau, e.g. "stop
once the interval is narrow enough". The sets are clipped to [0, 1] and running-intersected
(an intersection of CSs is a CS), so the bounds never widen.

Pure numpy: no mlflow/torch imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

_TRUNCATION = 0.5  # the paper's c in lambda_t <= c; it suggests 1/2 or 3/4


def _eb_bounds(x: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """PrPl-EB CS along the last axis of x (values in [0, 1]); clipped, running-intersected."""
    n = x.shape[-1]
    t = np.arange(1, n + 1, dtype=float)
    log_term = np.log(2.0 / alpha)
    mu_hat = (0.5 + np.cumsum(x, axis=-1)) / (t + 1)
    sigma2 = (0.25 + np.cumsum((x - mu_hat) ** 2, axis=-1)) / (t + 1)
    lead = [(0, 0)] * (x.ndim - 1)
    mu_prev = np.pad(mu_hat[..., :-1], lead + [(1, 0)], constant_values=0.5)
    sigma2_prev = np.pad(sigma2[..., :-1], lead + [(1, 0)], constant_values=0.25)
    lam = np.minimum(np.sqrt(2 * log_term / (sigma2_prev * t * np.log1p(t))), _TRUNCATION)
    psi = (-np.log1p(-lam) - lam) / 4
    v = 4 * (x - mu_prev) ** 2
    lam_sum = np.cumsum(lam, axis=-1)
    center = np.cumsum(lam * x, axis=-1) / lam_sum
    margin = (log_term + np.cumsum(v * psi, axis=-1)) / lam_sum
    lo = np.maximum.accumulate(np.clip(center - margin, 0.0, 1.0), axis=-1)
    hi = np.minimum.accumulate(np.clip(center + margin, 0.0, 1.0), axis=-1)
    return lo, hi


def _as_unit_scores(scores) -> np.ndarray:
    x = np.asarray(scores, dtype=float)
    if x.size and (np.isnan(x).any() or x.min() < 0.0 or x.max() > 1.0):
        raise ValueError("scores must lie in [0, 1]")
    return x


def confidence_sequence(scores: Sequence[float], alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper (1 - alpha) confidence-sequence bounds on the mean score after each row.

    scores in [0, 1]; returns two arrays of len(scores), valid simultaneously over all rows
    and never widening. A 2-D array is taken as one stream per row (for simulations).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    x = _as_unit_scores(scores)
    if x.shape[-1] == 0:
        return np.zeros(x.shape), np.zeros(x.shape)
    return _eb_bounds(x, alpha)


def paired_difference_sequence(a: Sequence[float], b: Sequence[float],
                               alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Confidence-sequence bounds on mean(a - b) after each row, for two arms scored on the same rows.

    d = a - b lies in [-1, 1]; the CS of (d + 1) / 2 in [0, 1] is mapped back to [-1, 1].
    """
    a_arr, b_arr = _as_unit_scores(a), _as_unit_scores(b)
    if a_arr.shape != b_arr.shape:
        raise ValueError("a and b must score the same rows")
    lo, hi = confidence_sequence((a_arr - b_arr + 1.0) / 2.0, alpha)
    return 2.0 * lo - 1.0, 2.0 * hi - 1.0


@dataclass(frozen=True)
class SequentialRule:
    """When to check and when to stop: first check after min_rows, then every step_rows;
    stop once the (1 - alpha) CS half-width is <= half_width or a paired CS excludes 0."""
    min_rows: int
    step_rows: int
    half_width: float
    alpha: float

    def __post_init__(self):
        if self.min_rows < 1 or self.step_rows < 1:
            raise ValueError("min_rows and step_rows must be >= 1")
        if not (self.half_width > 0.0 and 0.0 < self.alpha < 1.0):
            raise ValueError("half_width must be > 0 and alpha in (0, 1)")


def round_sizes(total_rows: int, rule: SequentialRule) -> list[int]:
    """Cumulative row counts at which to check: min_rows, min_rows + step, ..., total_rows."""
    if total_rows <= 0:
        return []
    sizes = list(range(min(rule.min_rows, total_rows), total_rows, rule.step_rows))
    return sizes + [total_rows]


def stop_reason(scores: Sequence[float], rule: SequentialRule,
                paired_with: Sequence[float] | None = None) -> str | None:
    """Why to stop evaluating after the rows scored so far, checked at a round boundary.

    "interval": the arm's CS half-width at the last row is <= rule.half_width;
    "decided": the paired-difference CS against paired_with (the other arm's scores on the
    same rows, same order; the common prefix is used, if it has >= min_rows) excludes 0;
    None: keep going.
    """
    x = _as_unit_scores(scores)
    if len(x) < rule.min_rows:
        return None
    lo, hi = confidence_sequence(x, rule.alpha)
    if (hi[-1] - lo[-1]) / 2.0 <= rule.half_width:
        return "interval"
    if paired_with is not None:
        m = min(len(x), len(paired_with))
        if m >= rule.min_rows:
            d_lo, d_hi = paired_difference_sequence(x[:m], np.asarray(paired_with, dtype=float)[:m],
                                                    rule.alpha)
            if d_lo[-1] > 0.0 or d_hi[-1] < 0.0:
                return "decided"
    return None
