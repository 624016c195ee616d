"""What a person reads: the terminal table, `roi_summary.md` and `cost_vs_volume.png`.

All three are drawn from one `Summary`, built either from a finished run in memory or
from the MLflow store (`roi report`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.measure.kinds import KINDS
from pipeline.report.format import (calls, finite, interval, logged_ci, months, not_measured, number, pct, pct_interval,
                                    usd)

@dataclass
class Summary:
    experiment: str
    task: str
    model: str
    n_eval: int
    arms: dict[str, dict[str, float]]
    parent: dict[str, float]
    baseline_arm: str | None
    candidate_arm: str | None
    monthly_calls: float
    run_id: str = ""
    decoding: str = "free"
    parser: str = "search"
    repeats: int = 1
    notes: list[str] = field(default_factory=list)
    error_cost_usd: float = 0.0
    confidence: float = 0.95  # of every interval (stats.confidence)
    # Arms with no figures, and why: "not measured: N of M calls failed (first error: ...)".
    not_measured: dict[str, str] = field(default_factory=dict)
    verdict: tuple[str, str] | None = None  # (decision, its one-sentence reason)
    horizon_months: float = 12.0
    what_if: list[dict] = field(default_factory=list)  # a prompt's measured tokens priced on hosted models
    cost_ranges: list[dict] = field(default_factory=list)  # where the candidate is cheaper / tied / dearer
    task_type: str = "classification"

    @property
    def primary(self) -> str:
        """The metric the compare and the verdict read: accuracy, field_f1 or chrf."""
        return KINDS[self.task_type].primary

    @property
    def primary_label(self) -> str:
        return KINDS[self.task_type].primary_label

    @property
    def secondary(self) -> tuple[str, str]:
        """The metric shown beside the primary (macro-F1, exact match, ROUGE-L), and its label."""
        return KINDS[self.task_type].secondary

    @property
    def break_even_calls(self) -> float | None:
        """One-off break-even (calls until the fine-tune's fixed cost is paid back); None: never."""
        return finite(self.parent.get("break_even_calls"))

    @property
    def break_even_monthly_calls(self) -> float | None:
        """Monthly volume above which the candidate's total over the horizon is lower; None: none found."""
        return finite(self.parent.get("break_even_monthly_calls"))

    @property
    def has_pair(self) -> bool:
        return bool(self.baseline_arm and self.candidate_arm and {self.baseline_arm, self.candidate_arm} <= set(self.arms))

    def fixed_cost(self, arm: str) -> float:
        return self.arms[arm].get("fixed_cost_usd", 0.0)


def arm_rows(summary: Summary) -> list[list[str]]:
    rows = []
    for arm, m in summary.arms.items():
        rows.append([
            arm,
            pct_interval(m[summary.primary], logged_ci(m, summary.primary)),
            f"{int(m.get('rows_evaluated', summary.n_eval)):,}",
            number(100 * m[summary.secondary[0]]),
            f"{100 * m['invalid_rate']:.1f}%",
            number(m["prompt_tokens_mean"]),
            number(m["completion_tokens_mean"]),
            number(m["latency_p50_ms"], 0),
            number(m["latency_p95_ms"], 0),
            number(m["throughput_calls_per_s"], 2),
            usd(m.get("cost_per_1k_calls_usd", 1000 * m["cost_per_call_usd"])),
            usd(m.get("monthly_cost_usd")),
        ])
    width = len(headers(summary))
    rows += [[arm, why] + ["-"] * (width - 2) for arm, why in summary.not_measured.items()]
    return rows


def headers(summary: Summary) -> list[str]:
    return ["arm", f"{summary.primary_label} [{summary.confidence:.0%} CI]", "rows", summary.secondary[1], "invalid", "prompt tok", "compl. tok",
            "p50 ms", "p95 ms", "calls/s", "$/1k calls", "$/month"]


def verdict(summary: Summary) -> str:
    """What a team lead acts on, first: the verdict and its reason, then each route's whole cost over the horizon,
    the monthly volume from which the fine-tune costs less, and its payback at the configured volume, all on the
    basis the verdict was decided on (wrong answers priced where an error cost is set)."""
    missing = [a for a in (summary.baseline_arm, summary.candidate_arm) if a in summary.not_measured]
    if missing:
        return (f"Not measurable: {' and '.join(missing)} {'was' if len(missing) == 1 else 'were'} not measured "
                f"({'; '.join(summary.not_measured[a].removeprefix('not measured: ') for a in missing)}).")
    if not summary.has_pair:
        return "No verdict: it needs a fine-tuned arm and a prompt arm to compare (compare.baseline, compare.candidate)."
    cand, p = summary.candidate_arm, summary.parent
    quality = _basis(summary)
    text = f"{summary.verdict[0].capitalize()}. {summary.verdict[1]}" if summary.verdict else ""
    if f"{quality}tco_baseline_usd" not in p:  # a run from before the horizon figures
        return text or "No verdict in this run."
    volume = p.get(f"{quality}break_even_monthly_calls")
    ci = logged_ci(p, f"{quality}break_even_monthly_calls")
    text += (f" Counting people, labels, training, evaluation, retraining and running, {cand} costs less over "
             f"{summary.horizon_months:g} months " + ("at every volume up to 1,000x this one" if volume == 0
             else f"from {interval(volume, ci)} calls/month on" if finite(volume)
             else "at no volume for good up to 1,000x this one"))
    months = p.get(f"{quality}payback_months")
    text += ("; at this volume it is never the dearer route." if months == 0
             else f"; at this volume its extra cost is recovered after {number(months, 1)} months." if finite(months)
             else "; at this volume its extra cost is never recovered.")
    return text.strip()


def _basis(summary: Summary) -> str:
    """The prefix of the figures the verdict is decided on: quality-adjusted where an error cost is set."""
    return ("quality_adjusted_" if summary.error_cost_usd and "quality_adjusted_tco_baseline_usd" in summary.parent
            else "")


def _break_even_text(summary: Summary) -> str:
    if not summary.has_pair:
        return "n/a"
    be, monthly = summary.break_even_calls, summary.break_even_monthly_calls
    if summary.error_cost_usd and "quality_adjusted_break_even_monthly_calls" in summary.parent:
        be = finite(summary.parent.get("quality_adjusted_break_even_calls"))
        monthly = finite(summary.parent["quality_adjusted_break_even_monthly_calls"])
    return (("never" if be is None else f"{calls(be)} calls") + " one-off at this volume, "
            + ("none" if monthly is None else f"{calls(monthly)} calls/month") + f" over {summary.horizon_months:g} months")


def parser_line(summary: Summary) -> str:
    """Each arm's accuracy under both parsers: how much of a prompt arm's score is its answer's format."""
    return (f"accuracy by parser (exact first line / label named anywhere; `{summary.parser}` is used above): "
            + ", ".join(f"{arm} {pct(m.get('accuracy_exact'))} / {pct(m.get('accuracy_search'))}"
                        for arm, m in summary.arms.items()))


def print_table(summary: Summary, console) -> None:
    from rich.table import Table

    table = Table(title=f"{summary.experiment}: {summary.task} on {summary.model}, {summary.n_eval} test rows")
    for i, header in enumerate(headers(summary)):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in arm_rows(summary):
        table.add_row(*row)
    console.print(table)
    p = summary.parent
    console.print(
        f"fine-tune fixed cost {usd(p.get('finetune_fixed_cost_usd'))}"
        f" | token reduction {number(p.get('token_reduction_x'))}x"
        f" | prompt engineering gain {number(p.get('prompt_gain_pts'))} pts"
    )
    console.print("latency CV across calls: " + ", ".join(
        f"{arm} {number(m.get('latency_cv'), 2)}" for arm, m in summary.arms.items())
        + (f"; across {summary.repeats} passes: " + ", ".join(
            f"{arm} {number(m.get('latency_repeat_cv'), 3)}" for arm, m in summary.arms.items())
           if summary.repeats > 1 else "")
        + f" | decoding {summary.decoding}")
    if summary.task_type == "classification":
        console.print(parser_line(summary))
    console.print(f"[bold]break-even: {_break_even_text(summary)}[/bold]. {verdict(summary)}")
    for note in summary.notes:
        console.print(f"note: {note}")


def summary_markdown(summary: Summary) -> str:
    lines = [
        f"# ROI summary: {summary.experiment}",
        "",
        f"Task `{summary.task}`, model `{summary.model}`, {summary.n_eval} test rows"
        + (f", MLflow run `{summary.run_id}`." if summary.run_id else "."),
        "",
        f"**{verdict(summary)}**",
        "",
        "| " + " | ".join(headers(summary)) + " |",
        "|" + "---|" * len(headers(summary)),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in arm_rows(summary)]
    p = summary.parent
    lines += [
        "",
        f"- Break-even: {_break_even_text(summary)} of {summary.candidate_arm} against {summary.baseline_arm}"
        + (f"; its extra cost recovered after {months(p[_basis(summary) + 'payback_months'])} at "
           f"{summary.monthly_calls:,.0f} calls/month." if _basis(summary) + "payback_months" in p else "."),
        "- Costs are at the configured volume: API arms by their measured tokens as the provider bills them,"
        " self-hosted arms as replicas sized for the peak, billed every hour (or per busy second).",
        f"- Fine-tuning one-off cost (people, labels, training x search runs, evaluation): "
        f"{usd(p.get('finetune_fixed_cost_usd'))}"
        + (f" (training {number(summary.arms[summary.candidate_arm].get('train_time_s'))} s,"
           f" {summary.arms[summary.candidate_arm].get('train_tokens', 0):,.0f} tokens)"
           if summary.candidate_arm in summary.arms else ""),
        f"- Token reduction ({summary.baseline_arm} / {summary.candidate_arm} prompt tokens):"
        f" {number(p.get('token_reduction_x'))}x",
        f"- Prompt engineering gain ({summary.baseline_arm} - naive prompt {summary.primary_label}):"
        f" {number(p.get('prompt_gain_pts'))} pts",
        *([f"- {parser_line(summary)[0].upper()}{parser_line(summary)[1:]}."]
          if summary.task_type == "classification" else []),
        "",
        f"Decoding: {summary.decoding}"
        + ((" (answers restricted to the label set, so none is invalid)." if summary.task_type == "classification"
            else " (answers restricted to the schema's JSON).") if summary.decoding == "constrained"
           else " (what the model would answer in production; unparseable answers count as invalid)."),
        "",
        "## Latency",
        "",
        f"Per-call wall time on the machine that ran the experiment, after warm-up calls,"
        f" {summary.repeats} timed pass{'es' if summary.repeats > 1 else ''} over the test rows"
        f"{' (each call: its median over the passes)' if summary.repeats > 1 else ''}."
        " CV is the coefficient of variation (std / mean).",
        "",
        "| arm | p50 ms | p95 ms | CV across calls | CV across passes | p50 ms without prefix cache |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {arm} | {number(m['latency_p50_ms'], 0)} | {number(m['latency_p95_ms'], 0)}"
        f" | {number(m.get('latency_cv'), 2)} | {number(m.get('latency_repeat_cv'), 3)}"
        f" | {number(m.get('latency_p50_ms_uncached'), 0)} |"
        for arm, m in summary.arms.items()
    ]
    lines += [
        "",
        "$/1k calls and $/month come from the `pricing` section applied to measured tokens or throughput at"
        f" {summary.monthly_calls:,.0f} calls/month.",
    ]
    lines += [f"- Note: {n}" for n in summary.notes]
    return "\n".join(lines) + "\n"


def arms_table(summary: Summary) -> list[dict[str, Any]]:
    """One row per arm, rounded for reading: what the parent run's table artifact shows."""
    rows = []
    for arm, m in summary.arms.items():
        role = "baseline" if arm == summary.baseline_arm else "candidate" if arm == summary.candidate_arm else ""
        rows.append({"arm": arm, "role": role, f"{summary.primary}_pct": round(100 * m[summary.primary], 1),
                     "prompt_tokens": round(m["prompt_tokens_mean"], 1),
                     "latency_p50_ms": round(m["latency_p50_ms"], 1),
                     "cost_per_1k_calls_usd": float(f"{m['cost_per_1k_calls_usd']:.4g}"),
                     "fixed_cost_usd": float(f"{summary.fixed_cost(arm):.4g}")})
    rows += [{"arm": arm, "not_measured": why} for arm, why in summary.not_measured.items()]
    return rows


def summary_from_runs(parent, children) -> Summary:
    """Rebuild a Summary from MLflow Run objects (a parent and its arm runs)."""
    params = parent.data.params
    # A learning-curve point has a run of its own but is no arm of the compare (`roi.role` curve_point).
    by_name = {child.data.tags["arm"]: child for child in children
               if child.data.tags.get("arm") and child.data.tags.get("roi.role", "arm") == "arm"}
    order = [a for a in params.get("arms", "").split(",") if a in by_name]  # as configured
    ordered = [by_name[name] for name in order + sorted(set(by_name) - set(order))]
    arms = {r.data.tags["arm"]: dict(r.data.metrics) for r in ordered if "failure" not in r.data.tags}
    failed = {r.data.tags["arm"]: not_measured(r.data.metrics.get("failed_calls", 0), r.data.metrics.get("calls", 0),
                                               r.data.tags["failure"]) for r in ordered if "failure" in r.data.tags}
    return Summary(
        experiment=params.get("experiment", ""),
        task=parent.data.tags.get("task", ""),
        model=parent.data.tags.get("model", ""),
        n_eval=int(params.get("n_eval", 0)),
        arms=arms,
        # A figure that never happens is a tag `...=never` (MLflow metrics are finite): read it back as inf.
        parent={**dict(parent.data.metrics),
                **{k: math.inf for k, v in parent.data.tags.items() if v == "never" and k != "break_even"}},
        baseline_arm=params.get("compare.baseline") or None,
        candidate_arm=params.get("compare.candidate") or None,
        monthly_calls=float(params.get("pricing.monthly_calls") or 100_000),
        run_id=parent.info.run_id,
        decoding=params.get("decoding", "free"),
        parser=params.get("eval.parser", "exact"),
        repeats=int(params.get("latency_repeats", 1)),
        error_cost_usd=float(params.get("pricing.error_cost_usd") or 0.0),
        confidence=float(params.get("stats.confidence") or 0.95),
        verdict=(tags["verdict"], tags.get("verdict_reason", "")) if "verdict" in (tags := parent.data.tags) else None,
        horizon_months=float(params.get("pricing.horizon_months") or 12),
        notes=[n for n in parent.data.tags.get("notes", "").split("\n") if n],
        not_measured=failed,
        task_type=params.get("task.type", "classification"),
    )


def print_check(task, report, console) -> None:
    """`roi data check` output: rows per split and label (or field coverage, reference lengths), lengths,
    duplicates, overlap."""
    splits = list(task.splits)
    what = (f"{len(task.labels)} labels" if task.type == "classification" else
            f"extraction of {len(report.field_coverage)} fields" if task.type == "extraction" else "generation")
    console.print(f"[bold]{task.name}[/bold]: {what}, "
                  + ", ".join(f"{s} {n}" for s, n in report.rows.items()) + " rows")
    if report.per_label:
        console.print(_split_table("rows per label", "label", splits,
                                   {label: [str(counts[s]) for s in splits] for label, counts in report.per_label.items()}))
    if report.field_coverage:
        console.print(_split_table("rows whose target gives the field a value (targets parse and follow the schema)",
                                   "field", splits, {name: [f"{100 * shares[s]:.1f}%" for s in splits]
                                                     for name, shares in report.field_coverage.items()}))
    stats = ("min", "p5", "median", "mean", "p95", "max")
    if report.target_words:
        console.print(_split_table("reference length in words", "split", stats,
                                   {split: [f"{v[k]:.0f}" for k in stats] for split, v in report.target_words.items()}))
    console.print(_split_table("length in words", "split", stats,
                               {split: [f"{v[k]:.0f}" for k in stats] for split, v in report.words.items()}))
    console.print("exact duplicates within splits: "
                  + ", ".join(f"{s} {n}" for s, n in report.exact_duplicates_within.items()))
    console.print(f"exact duplicates across splits: {len(report.exact_duplicates_across)}")
    console.print(f"near duplicates (TF-IDF cosine >= 0.9, not exact): {report.near_duplicates}")
    for example in report.near_duplicate_examples:
        console.print(f"  {example}")
    console.print(f"test rows sharing a word 5-gram with train: {100 * report.test_train_5gram_overlap:.1f}%")
    console.print("[green]ok[/green]" if not report.errors else f"[red]{len(report.errors)} problem(s)[/red]")


def _split_table(title: str, first: str, columns, rows: dict[str, list[str]]):
    """A rich table: a name column, then right-aligned `columns`, one row per entry of `rows`."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column(first)
    for column in columns:
        table.add_column(column, justify="right")
    for name, cells in rows.items():
        table.add_row(name, *cells)
    return table
