"""How every figure is written, once: the terminal table, Markdown, the HTML report and `roi compare` all use
these, so the same number reads the same everywhere. Unknown (None, NaN) is `-`; a count that never comes
(infinity) is `never`; an unbounded amount of money is `∞`."""

from __future__ import annotations

import math
from typing import Callable


def missing(v: float | None) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def finite(v: float | None) -> float | None:
    """The value where it is a finite number, else None."""
    return v if v is not None and isinstance(v, (int, float)) and math.isfinite(v) else None


def usd(v: float | None) -> str:
    """`$0`, `$1.2e-06` below a cent, `$1,234.57` otherwise; `-` when unknown, `∞` when unbounded."""
    if missing(v):
        return "-"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if v == 0:
        return "$0"
    return f"${v:.3g}" if abs(v) < 0.01 else f"${v:,.2f}"


def calls(v: float | None) -> str:
    """A call count rounded up (`12,345`: a break-even is reached only on the whole call after the crossing);
    `never` for None or infinity, `-` for NaN."""
    if v is None or (isinstance(v, float) and math.isinf(v)):
        return "never"
    if math.isnan(v):
        return "-"
    return f"{math.ceil(v):,}"


def pct(v: float | None) -> str:
    """A fraction as a percentage with one decimal: 0.8421 -> `84.2%`."""
    return "-" if missing(v) else f"{100 * v:.1f}%"


def signed_pct(v: float | None) -> str:
    """A change already in percent, signed: -42.04 -> `-42.0%`."""
    return "-" if missing(v) else f"{v:+.1f}%"


def number(v: float | None, digits: int = 1) -> str:
    return "-" if missing(v) else f"{v:,.{digits}f}"


def months(v: float | None) -> str:
    return "never" if v is None or math.isinf(v) else "-" if math.isnan(v) else f"{v:,.1f} months"


def interval(value: float | None, ci: list[float] | tuple[float, float] | None, fmt: Callable = calls,
             end: Callable | None = None) -> str:
    """`value [lo–hi]` with each end through `end` (default `fmt`); no brackets without an interval or where
    the resampled rows do not move it (both ends equal)."""
    end = end or fmt
    if not ci or ci[0] == ci[1]:
        return fmt(value)
    return f"{fmt(value)} [{end(ci[0])}–{end(ci[1])}]"


def pct_interval(value: float | None, ci) -> str:
    """`84.2% [80.9–87.3]`."""
    return interval(value, ci, pct, lambda e: pct(e).rstrip("%"))


def logged_ci(metrics: dict[str, float], name: str) -> list[float] | None:
    """The interval a run logged for `name` (`<name>_ci_low`, `<name>_ci_high`), or None."""
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    return None if low is None or high is None else [low, high]


def pvalue(p: float | None) -> str:
    return "-" if missing(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_reading(p: float | None, confidence: float, metric: str = "accuracy") -> str:
    """What a p-value says at the run's confidence level (`stats.confidence`)."""
    if missing(p):
        return "not computed"
    alpha = round(1 - confidence, 6)
    if p < alpha:
        return f"p < {alpha:g}: the {metric} difference is unlikely to be chance"
    return f"p ≥ {alpha:g}: the {metric} difference could be chance"


def not_measured(failed: float, total: float, first_error: str | None) -> str:
    """Why an arm has no figures: `not measured: 30 of 100 calls failed (first error: ...)`."""
    return (f"not measured: {int(failed):,} of {int(total):,} calls failed"
            + (f" (first error: {first_error})" if first_error else ""))
