"""`roi run`: the whole prompt-vs-fine-tune experiment, top to bottom.

config -> data -> for each arm: get its model, measure it, price it -> compare -> report.
Finished stages (an arm's evaluation, a trained adapter) are stored under a hash of their
inputs and reused by the next run of the same experiment unless `--force` is given.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import mlflow
import yaml

from pipeline.economics.decision import Decision, compare
from pipeline.backends.registry import backend_class
from pipeline.experiment.load import ExperimentPlan, project_root_for
from pipeline.measure.kinds import KINDS
from pipeline.recipe.arm_models import ArmModels
from pipeline.recipe.arm_run import Experiment, arm_inputs, run_arm
from pipeline.recipe.curve import check_curve, curve_figures, curve_points
from pipeline.recipe.distill import student_vs_teacher
from pipeline.recipe.stages import StageStore
from pipeline.report.charts import plot_cost_curves, plot_learning_curve, plot_sensitivity
from pipeline.report.facts import build_facts, json_safe, save_facts, write_report
from pipeline.report.summary import Summary, arms_table, print_table, summary_markdown
from pipeline.task.prompts import load_template, pick_examples
from pipeline.task.splits import eval_rows, load_task
from pipeline.tracking import mlflow_store as tracking


def run_experiment(plan: ExperimentPlan, console, force: bool = False, overrides: list[str] = ()) -> Summary:
    """Run every configured arm on the same test rows, log to MLflow, and return the summary."""
    cfg = plan.config
    exp = prepare(plan, console, force)  # everything that can be wrong with the inputs is found here
    experiment_id = tracking.connect(cfg.experiment, exp.primary)
    console.print(f"[bold]{cfg.experiment}[/bold]: {exp.task.name} ({len(exp.task.splits['train'])} train, "
                  f"{len(exp.rows)} test rows), arms {', '.join(a.name for a in plan.arms)}")
    results: dict[str, dict[str, float]] = {}
    with tracking.start_run(run_name(plan.path, overrides, time.localtime())) as parent:
        exp.parent_run_id = parent.info.run_id
        log_parent_inputs(exp)
        for arm in plan.arms:
            measured = run_arm(exp, arm)
            if measured is not None:
                results[arm.name] = measured
        curve = run_curve(exp, results) if plan.curve_arm else None
        note_stopped_throughput(exp)
        # An arm that was not measured has no figures: the compare, break-evens and verdict leave it out.
        pair = [name if name in results else None for name in (plan.pair.baseline, plan.pair.candidate,
                                                                 plan.pair.naive)]
        measured = {a.name: arm_inputs(exp, a, results[a.name]) for a in plan.arms if a.name in results}
        decision = compare(*pair, measured, exp.outcomes, cfg.pricing, cfg.stats, plan.what_if)
        distilled = student_vs_teacher(exp)
        for row in distilled[:1]:  # the first distilled arm's (MLflow metric names are fixed)
            decision.parent["student_teacher_mcnemar_p"] = row["mcnemar_p"]
        summary = summarise(exp, results, decision, parent.info.run_id)
        log_parent_results(exp, summary, decision, parent.info.run_name, curve, distilled)
    print_table(summary, console)
    console.print(f"outputs in {exp.run_dir}; MLflow run {summary.run_id} in {tracking.redact(tracking.tracking_uri())}")
    console.print(f"compare the arms in the MLflow UI (`roi ui` for a local store): "
                  f"{tracking.ui_link(experiment_id)}", soft_wrap=True)
    return summary


def note_stopped_throughput(exp: Experiment) -> None:
    """One note for the local batching arms whose throughput comes from a pass the sequential rule stopped."""
    stopped = [a.name for a in exp.plan.arms if exp.stopped_by.get(a.name, "all_rows") != "all_rows"
               and a.model.in_process and a.eval.batch_size > 1]
    if stopped:
        exp.notes.append(f"the throughput of {', '.join(stopped)} comes from passes the sequential rule stopped, "
                         "whose prompts joined the batch by length in windows of eval.sequential.step_rows: it can "
                         "read lower than a whole pass (eval.sequential: null measures one)")


def run_name(config_path: Path, overrides: list[str], when: time.struct_time) -> str:
    """What tells repeated runs apart in the UI: the config, the time, and the overrides that change results.
    The time comes second so that it stays visible where the UI cuts long names."""
    changes = " ".join(o for o in overrides if not o.startswith("output_dir="))
    if len(changes) > 160:  # MLflow keeps 250 characters
        changes = changes[:159] + "…"
    return " ".join(filter(None, [config_path.stem, time.strftime("%m-%d %H:%M", when), changes]))


def prepare(plan: ExperimentPlan, console, force: bool) -> Experiment:
    """Read the data, templates, adapters and keys; fail with one line before any model loads."""
    cfg = plan.config
    # A server that cannot answer is found before data loads or a model trains (not after a "finished" run).
    for backend, models in plan.models_by_backend().items():
        backend_class(backend).preflight(models)
    task = load_task(cfg.task, cfg.data)
    if plan.curve_arm:
        check_curve(cfg.curve, task)
    sequential = [a.name for a in plan.arms if a.eval.sequential]
    row_mean = KINDS[task.type].row_mean
    rows = eval_rows(task, cfg.eval.limit, cfg.data.seed, shuffled=bool(sequential) and row_mean)
    templates = {arm.name: load_template(arm.prompt) for arm in plan.arms}
    models = ArmModels(plan, console)
    models.check_inputs()
    train = task.splits["train"]
    examples = pick_examples(train["text"], train["label"], cfg.prompts.few_shot_k, cfg.data.seed)
    # Second resolution plus a random suffix: two runs started in the same second get their own folder.
    run_dir = cfg.output_dir / cfg.experiment / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    store = StageStore(cfg.output_dir / "stages", recompute=force)
    unvalidated = [a.name for a in plan.arms
                   if a.trains and a.finetune.early_stopping and not task.splits.get("validation")]
    notes = [f"finetune.early_stopping: {', '.join(unvalidated)} trained every epoch (the task has no validation "
             "split; give one in task.splits or set task.validation_size)"] if unvalidated else []
    if sequential and not row_mean:
        notes.append(f"eval.sequential: {KINDS[task.type].primary} is micro-averaged over field/value pairs, not a "
                     "mean over rows, so no confidence sequence covers it: every test row is scored")
    exp = Experiment(plan, task, rows, examples, templates, store, models=models, run_dir=run_dir, console=console,
                     notes=plan.notes + task.notes + models.notes + notes)
    models.check_schema_decoding(exp)
    return exp


def log_parent_inputs(exp: Experiment) -> None:
    """The parent run's tags, params (the config as resolved), config files and datasets."""
    cfg, task, config_path = exp.cfg, exp.task, exp.plan.path
    mlflow.set_tags({tracking.ROLE_TAG: "parent", "task": task.name,
                     "model": ", ".join(sorted({exp.models.display_name(a) for a in exp.plan.arms}))})
    tracking.log_params({
        **exp.plan.params(), "experiment": cfg.experiment, "dataset_hash": task.content_hash,
        "git_commit": tracking.git_commit(project_root_for(config_path)), "n_eval": len(exp.rows),
        "n_train": len(task.splits["train"]), "decoding": cfg.eval.decoding, "latency_repeats": cfg.eval.repeats,
    })
    if exp.notes:
        mlflow.set_tag("notes", "\n".join(exp.notes))
    mlflow.log_artifact(str(config_path), artifact_path="config")
    # As written (with the command line's overrides) and as resolved (every default filled in).
    (exp.run_dir / "config_as_written.yaml").write_text(yaml.safe_dump(exp.plan.written, sort_keys=False))
    (exp.run_dir / "resolved_config.yaml").write_text(yaml.safe_dump(exp.plan.resolved(), sort_keys=False))
    mlflow.log_artifact(str(exp.run_dir / "config_as_written.yaml"), artifact_path="config")
    mlflow.log_artifact(str(exp.run_dir / "resolved_config.yaml"), artifact_path="config")
    tracking.log_dataset(task.splits["train"].to_pandas(), str(task.files["train"]), f"{task.name}-train", "train")
    tracking.log_dataset(exp.rows.to_pandas(), str(task.files.get("test", task.files["train"])),
                         f"{task.name}-test", "eval")


def summarise(exp: Experiment, arms: dict[str, dict[str, float]], decision: Decision, run_id: str) -> Summary:
    cfg = exp.cfg
    parent = decision.parent
    return Summary(
        experiment=cfg.experiment, task=exp.task.name,
        model=", ".join(dict.fromkeys(exp.models.display_name(a) for a in exp.plan.arms)),
        n_eval=len(exp.rows), arms=arms, parent=parent, baseline_arm=exp.plan.pair.baseline,
        candidate_arm=exp.plan.pair.candidate, monthly_calls=cfg.pricing.monthly_calls, run_id=run_id,
        decoding=cfg.eval.decoding, parser=cfg.eval.parser, repeats=cfg.eval.repeats, notes=exp.notes,
        error_cost_usd=cfg.pricing.error_cost_usd,
        confidence=cfg.stats.confidence, not_measured=dict(exp.not_measured),
        verdict=decision.verdict, horizon_months=cfg.pricing.horizon_months, what_if=decision.what_if,
        cost_ranges=decision.ranges, task_type=cfg.task.type,
    )


def run_curve(exp: Experiment, results: dict[str, dict[str, float]]) -> dict | None:
    """The learning curve's points (child runs of their own) and figures; None where no point was measured."""
    points = curve_points(exp, results.get(exp.plan.curve_arm))
    return curve_figures(exp, points, results) if points else None


def log_curve(exp: Experiment, curve: dict, report_dir: Path) -> Path:
    """`learning_curve.json` and `.png` on the parent; `rows_to_match_baseline` and `rows_to_beat_baseline` as
    metrics (a `never` tag where no point qualifies), and `rows_for_target` with its fit's error."""
    from pipeline.economics.learning_curve import PowerLawFit

    (report_dir / "learning_curve.json").write_text(json.dumps(json_safe(curve), indent=1), encoding="utf-8")
    mlflow.log_artifact(str(report_dir / "learning_curve.json"))
    for key in ("rows_to_match_baseline", "rows_to_beat_baseline"):
        if curve.get("baseline") is None:
            continue
        if curve.get(key) is None:
            mlflow.set_tag(key, "never")
        else:
            mlflow.log_metric(key, curve[key])
    target = curve.get("target")
    if target:
        if math.isfinite(target["rows"]):
            mlflow.log_metric("rows_for_target", target["rows"])
            mlflow.set_tag("rows_for_target", "extrapolated" if target["extrapolated"] else "interpolated")
        else:
            mlflow.set_tag("rows_for_target", "never")
        mlflow.log_metric("curve_fit_rmse", curve["fit"]["rmse"])
    image = report_dir / "learning_curve.png"
    fit = PowerLawFit(**curve["fit"]) if curve.get("fit") else None
    plot_learning_curve(curve["points"], curve.get("baseline"), f"{exp.cfg.experiment}: {curve['arm']} by training "
                        "rows", image, fit=fit)
    mlflow.log_artifact(str(image))
    return image


def log_parent_results(exp: Experiment, summary: Summary, decision: Decision, run_name: str,
                       curve: dict | None = None, distilled: list[dict] | None = None) -> None:
    """The parent's figures (a figure that never happens is a tag `...=never`, not a metric), its arms table,
    the summary and the report with its plots and facts (under `report/`, for `roi report --out`)."""
    finite = {k: v for k, v in summary.parent.items() if math.isfinite(v)}
    mlflow.log_metrics(finite)
    never = sorted(k for k, v in summary.parent.items() if math.isinf(v))
    if never:
        mlflow.set_tags({k: "never" for k in never})
    if summary.has_pair and summary.break_even_calls is None:
        mlflow.set_tag("break_even", "never")
    if decision.verdict is not None:
        mlflow.set_tags({"verdict": decision.verdict[0], "verdict_reason": decision.verdict[1]})
    if exp.notes:  # with those the arms added while they ran
        mlflow.set_tag("notes", "\n".join(exp.notes))
    tracking.log_table(arms_table(summary), "arms.json")
    if decision.what_if:
        tracking.log_table(decision.what_if, "price_what_if.json")
    (exp.run_dir / "roi_summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    mlflow.log_artifact(str(exp.run_dir / "roi_summary.md"))
    report_dir = exp.run_dir / "report"
    report_dir.mkdir(exist_ok=True)
    for name, data in (("cost_curves.json", decision.curves), ("cost_ranges.json", decision.ranges)):
        (report_dir / name).write_text(json.dumps(json_safe(data), indent=1), encoding="utf-8")
        mlflow.log_artifact(str(report_dir / name))
    images = {"cost_vs_volume": report_dir / "cost_vs_volume.png", "sensitivity": report_dir / "sensitivity.png"}
    plot_cost_curves(decision.curves, f"{summary.experiment}: cost against calls per month", images["cost_vs_volume"])
    mlflow.log_artifact(str(images["cost_vs_volume"]))
    plot_sensitivity(decision.sensitivity, summary.parent, images["sensitivity"])
    if curve is not None:
        images["learning_curve"] = log_curve(exp, curve, report_dir)
    for arm in summary.arms:
        images[f"confusion_{arm}"] = exp.run_dir / arm / "confusion_matrix.png"
    facts = build_facts(exp, summary, decision, run_name, curve, distilled)
    save_facts(facts, report_dir / "facts.json")
    for path in write_report(facts, images, report_dir):
        mlflow.log_artifact(str(path), artifact_path="report")
    mlflow.log_artifact(str(report_dir / "facts.json"), artifact_path="report")
    for key, path in images.items():
        if key.startswith("confusion_") and path.is_file():
            mlflow.log_artifact(str(path), artifact_path=f"report/{key}")
    exp.console.print(f"report: {report_dir / 'roi_report.html'}")
