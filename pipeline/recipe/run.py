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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import yaml

from pipeline.economics import figures as economics
from pipeline.economics.decision import ArmInputs, Decision, arm_route, compare
from pipeline.economics.routes import Ownership
from pipeline.economics.stats import per_label_table
from pipeline.experiment.arms import Arm
from pipeline.backends.registry import backend_class
from pipeline.experiment.load import ExperimentPlan, flatten, project_root_for
from pipeline.measure.scoring import read_predictions
from pipeline.recipe.arm_models import ArmModels
from pipeline.recipe.evaluate import evaluate
from pipeline.recipe.inputs import RunInputs
from pipeline.recipe.stages import StageStore, machine, stage_key
from pipeline.report.charts import confusion_matrix_png, plot_cost_curves, plot_sensitivity
from pipeline.report.facts import build_facts, json_safe, save_facts, write_report
from pipeline.report.format import not_measured
from pipeline.report.summary import Summary, arms_table, print_table, summary_markdown
from pipeline.task.prompts import PromptRenderer, load_template, pick_examples
from pipeline.task.splits import eval_rows, load_task
from pipeline.tracking import mlflow_store as tracking


@dataclass
class Experiment(RunInputs):
    """One run: its inputs, the arms' models, and where its outputs go."""

    models: ArmModels = None  # type: ignore[assignment]  (always given; dataclass order needs a default)
    run_dir: Path = Path()
    console: Any = None
    notes: list[str] = field(default_factory=list)
    parent_run_id: str = ""
    outcomes: dict[str, Any] = field(default_factory=dict)  # arm name -> economics.figures.ArmRows
    not_measured: dict[str, str] = field(default_factory=dict)  # arm name -> why it has no figures
    stopped_by: dict[str, str] = field(default_factory=dict)  # arm name -> why its evaluation stopped


def run_experiment(plan: ExperimentPlan, console, force: bool = False, overrides: list[str] = ()) -> Summary:
    """Run every configured arm on the same test rows, log to MLflow, and return the summary."""
    cfg = plan.config
    exp = prepare(plan, console, force)  # everything that can be wrong with the inputs is found here
    experiment_id = tracking.connect(cfg.experiment)
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
        # An arm that was not measured has no figures: the compare, break-evens and verdict leave it out.
        pair = [name if name in results else None for name in (plan.pair.baseline, plan.pair.candidate,
                                                                 plan.pair.naive)]
        measured = {a.name: arm_inputs(exp, a, results[a.name]) for a in plan.arms if a.name in results}
        decision = compare(*pair, measured, exp.outcomes, cfg.pricing, cfg.stats, plan.what_if)
        summary = summarise(exp, results, decision, parent.info.run_id)
        log_parent_results(exp, summary, decision, parent.info.run_name)
    print_table(summary, console)
    console.print(f"outputs in {exp.run_dir}; MLflow run {summary.run_id} in {tracking.redact(tracking.tracking_uri())}")
    console.print(f"compare the arms in the MLflow UI (`roi ui` for a local store): "
                  f"{tracking.ui_link(experiment_id)}", soft_wrap=True)
    return summary


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
    rows = eval_rows(task, cfg.eval.limit, cfg.data.seed, shuffled=any(a.eval.sequential for a in plan.arms))
    templates = {arm.name: load_template(arm.prompt) for arm in plan.arms}
    models = ArmModels(plan, console)
    models.check_inputs()
    train = task.splits["train"]
    examples = pick_examples(train["text"], train["label"], cfg.prompts.few_shot_k, cfg.data.seed)
    # Second resolution plus a random suffix: two runs started in the same second get their own folder.
    run_dir = cfg.output_dir / cfg.experiment / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    store = StageStore(cfg.output_dir / "stages", recompute=force)
    unvalidated = [a.name for a in plan.arms if a.trains and a.finetune.early_stopping and not task.splits.get("validation")]
    notes = [f"finetune.early_stopping: {', '.join(unvalidated)} trained every epoch (the task has no validation "
             "split; give one in task.splits or set task.validation_size)"] if unvalidated else []
    return Experiment(plan, task, rows, examples, templates, store, models=models, run_dir=run_dir, console=console,
                      notes=plan.notes + task.notes + models.notes + notes)


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


def run_arm(exp: Experiment, arm: Arm) -> dict[str, float] | None:
    """One arm as a child run: get its model, measure it (or reuse a stored measurement), price it. None where
    more of its calls failed than `eval.max_failed_rate` allows: its run ends FAILED, saying why."""
    with tracking.start_run(arm.name, nested=True) as child:
        mlflow.set_tags({"arm": arm.name, "arm_kind": arm.kind, "backend": arm.backend,
                         "model": exp.models.display_name(arm), tracking.ROLE_TAG: "arm",
                         tracking.RUN_TYPE_TAG: tracking.EVALUATION_RUN})
        template = exp.templates[arm.name]
        prompt_uri = tracking.register_prompt(
            f"{exp.cfg.experiment}-{arm.name}", template.registry_template(),
            {"arm": arm.name, "file": template.path.name, "sha": template.sha},
            [child.info.run_id, exp.parent_run_id])
        # The arm's own settings only: the Trainer's full configuration is an artifact (arm_models).
        tracking.log_params({"prompt_uri": prompt_uri, "prompt_file": template.path.name,
                             "few_shot_k": exp.cfg.prompts.few_shot_k, "model_key": arm.model_key,
                             **flatten(arm.eval.model_dump(), "eval."),
                             **(flatten(arm.finetune.model_dump(), "finetune.") if arm.trains else {})})
        partner = pair_partner_scores(exp, arm)
        # The failed-call limit judges a measurement; it changes nothing measured, so it is not in the key.
        key = stage_key("eval", data=exp.task.content_hash, limit=exp.cfg.eval.limit, seed=exp.cfg.data.seed,
                        prompt=template.sha, examples=exp.examples,
                        eval=arm.eval.model_dump(exclude={"max_failed_rate"}),
                        model=exp.models.identity(arm), adapter=exp.models.adapter_key(arm, exp, template),
                        **({"quantize": arm.quantize} if arm.quantize else {}),
                        # Where the pair's difference may stop the arm, the other arm's scores decide when.
                        **({"paired_with": partner.astype(int).tolist()} if partner is not None else {}),
                        # A local arm's timings hold only on the machine and libraries that measured them.
                        **({"machine": machine()} if arm.model.in_process else {}))
        metrics, predictions, fresh, stopped_by = measure_arm(exp, arm, template, key, partner)
        failure = unmeasured(arm, predictions)
        if failure is not None:
            log_not_measured(exp, arm, metrics, predictions, failure)
            return None
        if fresh:  # stored only once it counts as measured: a rerun retries an arm that was not
            exp.store.finish(key, {"metrics": metrics, "stopped_by": stopped_by}, {"predictions.jsonl": predictions})
        mlflow.set_tag("stopped_by", stopped_by)
        exp.stopped_by[arm.name] = stopped_by
        exp.models.log_adapter(arm, exp, template)
        if metrics.get("tokens_estimated"):
            mlflow.set_tag("tokens", "estimated")
        price_arm(exp, arm, metrics, predictions)
        exp.console.print(f"{arm.name:<12} accuracy {100 * metrics['accuracy']:.1f}%  "
                          + stop_words(stopped_by, metrics, len(exp.rows))
                          + f"invalid {100 * metrics['invalid_rate']:.1f}%  "
                          + (f"failed {100 * metrics['failed_rate']:.1f}%  " if metrics.get("failed_rate") else "")
                          + f"{metrics['prompt_tokens_mean']:.0f} prompt tokens  p50 {metrics['latency_p50_ms']:.0f} ms")
        return metrics


def pair_partner_scores(exp: Experiment, arm: Arm):
    """The compare pair's other arm's 0/1 scores on the test rows, where `arm` is in the pair, evaluates
    sequentially and the other arm was measured before it; else None."""
    pair = (exp.plan.pair.baseline, exp.plan.pair.candidate)
    if arm.eval.sequential is None or arm.name not in pair or pair[0] == pair[1]:
        return None
    other = exp.outcomes.get(pair[1] if arm.name == pair[0] else pair[0])
    return None if other is None else other.correct.astype(float)


def stop_words(stopped_by: str, metrics: dict[str, float], rows: int) -> str:
    """How many rows the arm was scored on and why it stopped there, for the console."""
    evaluated = int(metrics.get("rows_evaluated", rows))
    why = {"interval": "its accuracy was known", "decided": "the pair was decided"}.get(stopped_by)
    return f"on {evaluated} of {rows} rows ({why})  " if why else ""


def measure_arm(exp: Experiment, arm: Arm, template, key: str,
                partner) -> tuple[dict[str, float], Path, bool, str]:
    """The arm's measurements, predictions file and why its evaluation stopped: stored ones where its stage is
    finished (fresh: False), else measured now."""
    done = exp.store.load(key)
    if done is not None:
        # Same inputs, same code: the stored evaluation stands; say so in the run.
        mlflow.set_tags({"reused": "true", "reused_stage": key})
        exp.console.print(f"{arm.name:<12} reused stored results ({key})")
        return done["metrics"], exp.store.path(key) / "predictions.jsonl", False, done.get("stopped_by", "all_rows")
    backend, metrics = exp.models.backend(arm, exp, template)
    predictions = exp.run_dir / arm.name / "predictions.jsonl"
    renderer = PromptRenderer(template, exp.models.tokenizer_for(arm), exp.task.labels, exp.examples)
    try:
        measured, stopped_by = evaluate(exp, arm, backend, renderer, predictions, exp.console, partner)
    finally:
        backend.close()
    return {**metrics, **measured}, predictions, True, stopped_by


def unmeasured(arm: Arm, predictions: Path) -> Failure | None:
    """Why the arm's figures would measure its failures rather than its model: more of its calls failed (after
    their retries) than `eval.max_failed_rate` allows, or none was answered. None where it is measured."""
    rows = read_predictions(predictions)
    failed = [r for r in rows if r.get("error")]
    if not failed or (len(failed) < len(rows) and len(failed) / len(rows) <= arm.eval.max_failed_rate):
        return None
    return Failure(len(failed), len(rows), failed[0]["error"])


@dataclass(frozen=True)
class Failure:
    """An arm that could not be measured: how many of its calls failed, and the first error (its key masked)."""

    failed: int
    calls: int
    first_error: str

    def __str__(self) -> str:
        return not_measured(self.failed, self.calls, self.first_error)


def log_not_measured(exp: Experiment, arm: Arm, metrics: dict[str, float], predictions: Path, failure: Failure) -> None:
    """The arm's run ends FAILED with a `failure` tag and the failed-call counts, its predictions kept; no figure
    measured from failures (latency, throughput, tokens, cost) is logged."""
    mlflow.set_tag("failure", failure.first_error)
    mlflow.log_metrics({"calls": float(failure.calls), "failed_calls": float(failure.failed),
                        "failed_rate": failure.failed / failure.calls})
    mlflow.log_artifact(str(predictions))
    exp.not_measured[arm.name] = str(failure)
    exp.console.print(f"{arm.name:<12} {failure}", markup=False)
    mlflow.end_run("FAILED")


def price_arm(exp: Experiment, arm: Arm, metrics: dict[str, float], predictions: Path) -> None:
    """The arm's cost figures and intervals (prices are not part of a stage: stored measurements are re-priced on
    every run), logged with its measurements, predictions and per-label scores."""
    pricing = exp.cfg.pricing
    metrics["batch_size"] = float(arm.eval.batch_size)  # the batched pass's size: what a deployment can batch
    # Everything the route costs once: people, labels, training x search runs, evaluation.
    metrics["fixed_cost_usd"] = arm_route(arm_inputs(exp, arm, metrics), pricing).one_off_usd
    metrics.update(economics.arm_figures(arm.price, metrics, pricing))
    rows = exp.outcomes[arm.name] = economics.ArmRows.from_predictions(read_predictions(predictions), exp.labels)
    metrics.update(economics.arm_intervals(rows, arm.price, metrics, pricing, exp.cfg.stats))
    if "accuracy_cs_low" in metrics:  # evaluated sequentially: only the confidence sequence holds at its stop
        metrics["accuracy_ci_low"], metrics["accuracy_ci_high"] = metrics["accuracy_cs_low"], metrics["accuracy_cs_high"]
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(predictions))
    log_label_scores(exp, arm, rows)


def log_label_scores(exp: Experiment, arm: Arm, rows: economics.ArmRows) -> None:
    """Per-label precision, recall and F1 (a table) and the confusion matrix (an image) on the arm's run."""
    tracking.log_table(per_label_table(rows.predicted, rows.gold, exp.labels), "per_label.json")
    image = exp.run_dir / arm.name / "confusion_matrix.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    confusion_matrix_png(rows.predicted, rows.gold, exp.labels, image, f"{arm.name}: gold (rows) vs predicted")
    mlflow.log_artifact(str(image))


def arm_inputs(exp: Experiment, arm: Arm, metrics: dict[str, float]) -> ArmInputs:
    """A measured arm as the money math takes it: its price, figures, what owning its route involves."""
    own = Ownership(arm.kind, arm.fixed_cost_usd, arm.finetune.search_runs if arm.finetune else 1,
                    arm.finetune.retrain_every_months if arm.finetune else None, len(exp.task.splits["train"]),
                    len(exp.rows))
    return ArmInputs(arm.name, arm.price, metrics, own)


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
        cost_ranges=decision.ranges,
    )


def log_parent_results(exp: Experiment, summary: Summary, decision: Decision, run_name: str) -> None:
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
    for arm in summary.arms:
        images[f"confusion_{arm}"] = exp.run_dir / arm / "confusion_matrix.png"
    facts = build_facts(exp, summary, decision, run_name)
    save_facts(facts, report_dir / "facts.json")
    for path in write_report(facts, images, report_dir):
        mlflow.log_artifact(str(path), artifact_path="report")
    mlflow.log_artifact(str(report_dir / "facts.json"), artifact_path="report")
    for key, path in images.items():
        if key.startswith("confusion_") and path.is_file():
            mlflow.log_artifact(str(path), artifact_path=f"report/{key}")
    exp.console.print(f"report: {report_dir / 'roi_report.html'}")
