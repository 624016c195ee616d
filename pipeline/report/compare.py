"""`roi compare`: several experiments' parent runs side by side (printed, and written as Markdown and CSV)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pipeline.economics.figures import paired_p
from pipeline.measure.kinds import KINDS
from pipeline.tracking import mlflow_store as tracking
from pipeline.report.format import calls, logged_ci, months, pct_interval, pvalue, usd

COLUMNS = ("experiment", "run", "verdict", "baseline", "candidate", "baseline accuracy", "candidate accuracy",
           "token reduction", "baseline $/1k calls", "candidate $/1k calls", "baseline $/month", "candidate $/month",
           "baseline total over the horizon", "candidate total over the horizon", "break-even (calls)",
           "break-even volume (calls/month)", "payback", "McNemar p")


def _break_even(value: float | None, tag: str | None) -> str:
    """A break-even as the report writes it; `never` where the run tagged it so, `-` where it has none."""
    if value is None and tag != "never":
        return "-"
    return calls(value)


def _quality(metrics: dict[str, float], task_type: str) -> str:
    """The arm's primary metric with its interval; named where it is not accuracy (an extraction's field-F1)."""
    kind = KINDS.get(task_type, KINDS["classification"])
    text = pct_interval(metrics.get(kind.primary), logged_ci(metrics, kind.primary))
    return text if kind.primary == "accuracy" else f"{text} {kind.primary_label}"


def run_row(parent: Any, children: list[Any]) -> dict[str, str]:
    """One parent run's headline figures."""
    params, metrics, tags = parent.data.params, parent.data.metrics, parent.data.tags
    arms = {c.data.tags.get("arm"): c.data.metrics for c in children if c.data.tags.get("roi.role", "arm") == "arm"}
    base_name, cand_name = params.get("compare.baseline", ""), params.get("compare.candidate", "")
    base, cand = arms.get(base_name, {}), arms.get(cand_name, {})
    test, p = paired_p(metrics)
    task_type = params.get("task.type", "classification")
    return {
        "experiment": params.get("experiment", ""), "run": parent.info.run_name or parent.info.run_id,
        "verdict": tags.get("verdict", "-"), "baseline": base_name, "candidate": cand_name,
        "baseline accuracy": _quality(base, task_type), "candidate accuracy": _quality(cand, task_type),
        "token reduction": f"{metrics['token_reduction_x']:.1f}x" if "token_reduction_x" in metrics else "-",
        "baseline $/1k calls": usd(base.get("cost_per_1k_calls_usd")),
        "candidate $/1k calls": usd(cand.get("cost_per_1k_calls_usd")),
        "baseline $/month": usd(base.get("monthly_cost_usd")), "candidate $/month": usd(cand.get("monthly_cost_usd")),
        "break-even (calls)": _break_even(metrics.get("break_even_calls"), tags.get("break_even_calls")
                                     or tags.get("break_even")),
        "baseline total over the horizon": usd(metrics.get("tco_baseline_usd")),
        "candidate total over the horizon": usd(metrics.get("tco_candidate_usd")),
        "break-even volume (calls/month)": _break_even(metrics.get("break_even_monthly_calls"),
                                                       tags.get("break_even_monthly_calls")),
        "payback": months(metrics.get("payback_months")) if "payback_months" in metrics or
        tags.get("payback_months") == "never" else "-",
        "McNemar p": pvalue(p) + (" (permutation)" if test == "permutation_p" else ""),
    }


def compare_runs(run_ids: list[str], experiments: list[str], out_dir: Path, console: Any) -> list[dict[str, str]]:
    """Find each run (or each experiment's latest finished run), print the table, write roi_compare.md/.csv."""
    import mlflow
    from rich.table import Table

    from pipeline.experiment.config import ConfigError

    if not run_ids and not experiments:
        raise ConfigError("roi compare: give parent run ids and/or --experiment NAME (repeatable)")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    found = [tracking.find_parent_run("", run_id) for run_id in run_ids]
    found += [tracking.find_parent_run(name) for name in experiments]
    rows = [run_row(parent, children) for parent, children in found]
    table = Table(title=f"{len(rows)} runs side by side")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in COLUMNS[:4] else "right")
    for row in rows:
        table.add_row(*(row[c] for c in COLUMNS))
    console.print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(row[c].replace("|", "\\|") for c in COLUMNS) + " |" for row in rows]
    (out_dir / "roi_compare.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    with (out_dir / "roi_compare.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {out_dir / 'roi_compare.md'} and {out_dir / 'roi_compare.csv'}")
    return rows
