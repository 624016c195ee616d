"""The learning curve: the curve arm trained again on nested, label-stratified subsets of the train split
(each point a stage and a child run of its own), evaluated on the same test rows; then where it meets the
prompt route: the fewest rows not significantly worse, and significantly better, than the baseline; an
inverse power law fitted to the points; and the cheapest data budget that beats the prompt route, priced
with its break-evens."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from pipeline.economics.decision import compare
from pipeline.experiment.config import ConfigError, CurveConfig
from pipeline.economics.learning_curve import fit_power_law, rows_for_target, rows_to_beat, rows_to_match
from pipeline.economics.routes import training_usd
from pipeline.recipe.arm_run import Experiment, arm_inputs, run_arm
from pipeline.task.subsets import nested_stratified_subsets
from pipeline.task.types import TaskData
from pipeline.tracking import mlflow_store as tracking


def check_curve(curve: CurveConfig, task: TaskData) -> None:
    """Every curve size fits the train split and holds a row of each label; one line where not."""
    train, labels = len(task.splits["train"]), len(task.labels)
    for i, rows in enumerate(curve.rows):
        if rows > train:
            raise ConfigError(f"curve.rows[{i}]: {rows} is more than the train split's {train} rows")
        if rows < labels:
            raise ConfigError(f"curve.rows[{i}]: {rows} rows cannot hold one row of each of the task's {labels} labels")


@dataclass
class CurvePoint:
    rows: int
    arm: str  # the name its run, stages and outcomes go under
    metrics: dict[str, float]


def curve_points(exp: Experiment, full: dict[str, float] | None) -> list[CurvePoint]:
    """Train and measure the curve arm on each `curve.rows` subset; the full train split is the last point (the
    arm's own measurement, `full`). A subset is a task whose train split is those rows, so its adapter and
    evaluation are stages of their own, reused by the next run."""
    arm = next(a for a in exp.plan.arms if a.name == exp.plan.curve_arm)
    train = exp.task.splits["train"]
    sizes = sorted({n for n in exp.cfg.curve.rows if n < len(train)})
    points = []
    for rows, subset in zip(sizes, nested_stratified_subsets(list(train["label"]), sizes, exp.cfg.data.seed)):
        name = f"{arm.name}-{rows}rows"  # an arm name MLflow takes (its prompt registry refuses "@")
        exp.console.print(f"[bold]learning curve[/bold]: {arm.name} on {rows} of {len(train)} training rows")
        task = replace(exp.task, splits={**exp.task.splits, "train": train.select(subset)},
                       content_hash=f"{exp.task.content_hash}:train{rows}")
        at_rows = replace(exp, task=task, templates={**exp.templates, name: exp.templates[arm.name]})
        metrics = run_arm(at_rows, replace(arm, name=name),
                          {tracking.ROLE_TAG: "curve_point", "curve_point": arm.name, "train_rows": str(rows)})
        if metrics is not None:
            points.append(CurvePoint(rows, name, metrics))
    if full is not None:
        points.append(CurvePoint(len(train), arm.name, full))
    return points


def curve_figures(exp: Experiment, points: list[CurvePoint], results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """`learning_curve.json`: each point's accuracy with its interval, training time and cost, labelling cost;
    the rows that match and beat the baseline; the power-law fit and the rows for `curve.target_accuracy`; the
    cheapest data budget that beats the baseline with its break-evens."""
    cfg, baseline = exp.cfg, exp.plan.pair.baseline
    table = [{"rows": p.rows, "arm": p.arm, "accuracy": p.metrics["accuracy"],
              "accuracy_ci_low": p.metrics.get("accuracy_ci_low"),
              "accuracy_ci_high": p.metrics.get("accuracy_ci_high"),
              "rows_evaluated": int(p.metrics.get("rows_evaluated", len(exp.rows))),
              "train_time_s": p.metrics.get("train_time_s"), "training_usd": training_usd(p.metrics, cfg.pricing),
              # as its run priced it (a distilled arm's: its teacher's calls)
              "labelling_usd": p.metrics["labelling_cost_usd"]} for p in points]
    out: dict[str, Any] = {"arm": exp.plan.curve_arm, "points": table, "baseline": None}
    alpha = 1 - cfg.stats.confidence
    if baseline in results:
        base = results[baseline]
        out["baseline"] = {"name": baseline, "accuracy": base["accuracy"],
                           "accuracy_ci_low": base.get("accuracy_ci_low"),
                           "accuracy_ci_high": base.get("accuracy_ci_high")}
        correct = [(p.rows, exp.outcomes[p.arm].score) for p in points]
        out["rows_to_match_baseline"] = rows_to_match(correct, exp.outcomes[baseline].score, alpha)
        out["rows_to_beat_baseline"] = rows_to_beat(correct, exp.outcomes[baseline].score, alpha)
        out["cheapest_beating"] = _cheapest_beating(exp, points, results, out["rows_to_beat_baseline"])
    fit = fit_power_law([p.rows for p in points], [p.metrics["accuracy"] for p in points])
    out["fit"] = None if fit is None else {"a": fit.a, "b": fit.b, "c": fit.c, "rmse": fit.rmse}
    target = cfg.curve.target_accuracy
    if target is not None and fit is not None:
        needed = rows_for_target(fit, target)
        out["target"] = {"accuracy": target, "rows": needed,
                         "extrapolated": math.isfinite(needed) and needed > max(p.rows for p in points)}
    return out


def _cheapest_beating(exp: Experiment, points: list[CurvePoint], results: dict[str, dict[str, float]],
                      rows: int | None) -> dict[str, Any] | None:
    """The smallest training set significantly better than the baseline, its data and training cost, and the
    pair's break-evens were that point the fine-tune."""
    point = next((p for p in points if p.rows == rows), None)
    if point is None:
        return None
    cfg, baseline = exp.cfg, exp.plan.pair.baseline
    arm = next(a for a in exp.plan.arms if a.name == exp.plan.curve_arm)
    inputs = {baseline: arm_inputs(exp, next(a for a in exp.plan.arms if a.name == baseline), results[baseline]),
              point.arm: arm_inputs(exp, replace(arm, name=point.arm), point.metrics, n_train=point.rows)}
    decision = compare(baseline, point.arm, None, inputs, exp.outcomes, cfg.pricing, cfg.stats, {})
    p = decision.parent
    return {"rows": point.rows,
            "labelling_usd": point.metrics["labelling_cost_usd"],
            "training_usd": training_usd(point.metrics, cfg.pricing),
            "break_even_monthly_calls": p.get("break_even_monthly_calls"),
            "quality_adjusted_break_even_monthly_calls": p.get("quality_adjusted_break_even_monthly_calls"),
            "verdict": decision.verdict[0] if decision.verdict else None}
