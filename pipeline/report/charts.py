"""The report's charts, drawn from what a run saved (never recomputed here): cost against monthly volume from
`cost_curves.json`, the break-evens' sensitivity tornado, and each arm's confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.economics.learning_curve import PowerLawFit
from pipeline.economics.stats import INVALID, present_labels
from pipeline.report.format import calls, finite

_STYLES = {"api": "-", "always_on": "-", "per_second": "-."}
EXTRAPOLATE_TO = 3  # the power-law fit is drawn up to this multiple of the most training rows measured


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cost_curves(curves: dict[str, Any], title: str, path: Path) -> None:
    """Each route's cost per month and its total over the horizon (fixed costs included) against calls per month,
    log-log: an API as a line, a self-hosted route as steps at each replica it adds, per-second billing dash-dotted;
    the configured volume as a dotted vertical line and each break-even marked; quality-adjusted costs dashed."""
    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()
    volumes = np.array(curves["volumes"], dtype=float)
    panels = [("monthly_usd", "cost per month (USD)"),
              ("horizon_usd", f"total over {curves['horizon_months']:g} months (USD)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    for ax, (key, label) in zip(axes, panels):
        for i, route in enumerate(curves["routes"]):
            color = f"C{i}"
            name = route["name"] + (f" ({route['role']})" if route.get("role") else "")
            ax.plot(volumes, _positive(route[key]), _STYLES.get(route["kind"], "-"), color=color, label=name)
            quality = route.get(f"quality_adjusted_{key}")
            if quality:
                ax.plot(volumes, _positive(quality), "--", color=color, alpha=0.7, label=f"{route['name']}, errors priced")
        ax.axvline(curves["configured_volume"], color="black", linestyle=":", linewidth=1)
        for mark in curves.get("break_evens", []):
            if finite(mark.get("volume")) and mark["volume"] > 0 and mark.get("panel", "horizon_usd") == key:
                ax.axvline(mark["volume"], color="grey", linestyle="--", linewidth=1)
                ax.annotate(f"{mark['label']}\n{calls(mark['volume'])}/month", (mark["volume"], 0.92),
                            xycoords=("data", "axes fraction"), fontsize=7, ha="left", va="top")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"${v:,.0f}" if v >= 1 else f"${v:.2g}"))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: compact(v)))
        ax.set_xlabel("calls per month (dotted: the configured volume)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compact(v: float) -> str:
    """A tick label short enough for a log axis: 10k, 2.5M, 1B."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= size:
            return f"{v / size:g}{suffix}"
    return f"{v:g}"


def _positive(values: list[float]) -> np.ndarray:
    """A cost of $0 has no point on a log axis: left out rather than drawn at the axis' edge."""
    array = np.array(values, dtype=float)
    return np.where(array > 0, array, np.nan)


def cost_chart_text(curves: dict[str, Any]) -> str:
    """The chart in words (the HTML report's text alternative): where the routes cross and why."""
    routes = {r["role"]: r for r in curves["routes"] if r.get("role")}
    marks = [m for m in curves.get("break_evens", []) if m.get("panel", "horizon_usd") == "horizon_usd"]
    if "baseline" not in routes or "candidate" not in routes:
        return "Cost per month and over the horizon of each arm against calls per month."
    base, cand = routes["baseline"], routes["candidate"]
    text = (f"Cost of {base['name']} ({_kind_words(base)}) and {cand['name']} ({_kind_words(cand)}) against calls "
            f"per month; the configured volume is {calls(curves['configured_volume'])} calls/month. ")
    # The figure the verdict is decided on: with errors priced where an error cost is set.
    crossing = next((m for m in marks if m["key"] == "quality_adjusted_break_even_monthly_calls"),
                    next((m for m in marks if m["key"] == "break_even_monthly_calls"), None))
    if crossing is None or not finite(crossing.get("volume")):
        return text + (f"Over {curves['horizon_months']:g} months {cand['name']} does not cost less than "
                       f"{base['name']} for good at any volume drawn.")
    if crossing["volume"] == 0:
        return text + f"{cand['name']} costs less over {curves['horizon_months']:g} months at every volume drawn."
    return text + (f"Over {curves['horizon_months']:g} months, fixed costs included, {cand['name']} costs less from "
                   f"{calls(crossing['volume'])} calls/month on.")


def _kind_words(route: dict[str, Any]) -> str:
    return {"api": "an API, paid per token", "always_on": "self-hosted, billed every hour",
            "per_second": "self-hosted, billed per busy second"}.get(route["kind"], route["kind"])


SENSITIVITY_TITLES = {"break_even_calls": "one-off break-even (calls)",
                      "break_even_monthly_calls": "break-even volume over the horizon (calls/month)",
                      "quality_adjusted_break_even_monthly_calls": "break-even volume, errors priced (calls/month)"}


def plot_sensitivity(rows: list[dict], base: dict[str, float | None], path: Path) -> bool:
    """A tornado chart per break-even: for each factor, the break-even with that factor alone at -50% (◀) and
    +50% (▶), joined by a bar; `never` sits at the right edge. False (no file) when no value is finite."""
    plt = _pyplot()
    panels = []
    for figure in dict.fromkeys(r["figure"] for r in rows):
        mine = [r for r in rows if r["figure"] == figure]
        values = [v for r in mine for v in (r["low"], r["high"]) if finite(v) is not None] + \
                 ([base[figure]] if finite(base.get(figure)) is not None else [])
        if any(v > 0 for v in values):
            panels.append((figure, mine, values))
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 1.4 + 1.5 * len(panels)), dpi=120, squeeze=False)
    for ax, (figure, mine, values) in zip(axes[:, 0], panels):
        positive = [v for v in values if v > 0]
        left, right = min(positive) / 3, max(positive) * 3
        for i, r in enumerate(mine):
            xs = [right if finite(v) is None else max(v, left) for v in (r["low"], r["high"])]
            ax.plot(xs, [i, i], color="tab:gray", linewidth=6, alpha=0.35, solid_capstyle="butt")
            ax.scatter(xs[0], i, marker="<", color="tab:blue", zorder=3, label="-50%" if i == 0 else None)
            ax.scatter(xs[1], i, marker=">", color="tab:orange", zorder=3, label="+50%" if i == 0 else None)
            for x, v in zip(xs, (r["low"], r["high"])):
                if finite(v) is None:
                    ax.annotate("never", (x, i), xytext=(6, -3), textcoords="offset points", fontsize=7)
        if finite(base.get(figure)) is not None:
            ax.axvline(base[figure], color="black", linewidth=1, label="measured")
        ax.set_xscale("log")
        ax.set_xlim(left, right * 4)
        ax.set_yticks(range(len(mine)), [r["factor"] for r in mine], fontsize=8)
        ax.set_title(SENSITIVITY_TITLES.get(figure, figure.replace("_", " ")), fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def confusion_matrix_png(predictions: Sequence[int], references: Sequence[int], labels: list[str], path: Path,
                         title: str) -> None:
    """Confusion matrix (rows gold, columns predicted, plus an "invalid" column when needed) as a PNG."""
    from sklearn.metrics import confusion_matrix

    plt = _pyplot()
    present = present_labels(predictions, references)
    columns = present + ([INVALID] if INVALID in set(predictions) else [])
    # Counted over the columns' labels and cut to the gold rows: -1 is never gold, so its row would be empty.
    counts = confusion_matrix(references, predictions, labels=columns)[: len(present)]
    names = [labels[label] for label in present]
    column_names = names + (["invalid"] if INVALID in columns else [])

    side = max(5.0, 0.22 * len(columns) + 2.5)  # ~0.22 inch per label keeps 80 ticks apart at 6 pt
    font = 8 if len(columns) <= 30 else 6
    fig, ax = plt.subplots(figsize=(side, side * len(present) / len(columns) + 1.0), dpi=120)
    image = ax.imshow(counts, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.6)
    ax.set_xticks(range(len(columns)), column_names, rotation=90, fontsize=font)
    ax.set_yticks(range(len(present)), names, fontsize=font)
    if len(columns) <= 30:  # counts in the cells are legible only on small matrices
        for (row, col), n in np.ndenumerate(counts):
            if n:
                ax.text(col, row, str(n), ha="center", va="center", fontsize=font,
                        color="white" if n > counts.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_learning_curve(points: list[dict], baseline: dict | None, title: str, path: Path,
                        fit: PowerLawFit | None = None) -> None:
    """Accuracy (%) against training rows on a log axis: the fine-tune's points joined by a line over their
    interval's band; the baseline's accuracy as a horizontal line over its band, labelled with its name; a
    power-law fit dashed over the points and past them."""
    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()

    ordered = sorted(points, key=lambda point: point["rows"])
    rows = np.array([point["rows"] for point in ordered], dtype=float)

    def percent(key: str) -> np.ndarray:
        return 100 * np.array([point[key] for point in ordered], dtype=float)

    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=120)
    ax.fill_between(rows, percent("accuracy_ci_low"), percent("accuracy_ci_high"), color="C0", alpha=0.2)
    ax.plot(rows, percent("accuracy"), "o-", color="C0", label="fine-tune (band: interval)")
    if baseline is not None:
        ax.axhspan(100 * baseline["accuracy_ci_low"], 100 * baseline["accuracy_ci_high"], color="C1", alpha=0.15)
        ax.axhline(100 * baseline["accuracy"], color="C1", label=baseline["name"])
    if fit is not None and len(rows):
        drawn = np.geomspace(rows.min(), EXTRAPOLATE_TO * rows.max(), 200)
        ax.plot(drawn, 100 * fit.predict(drawn), "--", color="C2",
                label="power-law fit (extrapolation past the last point)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: compact(v)))
    ax.set_xlabel("training rows")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
