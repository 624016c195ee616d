"""One arm of a run as its MLflow child run: get its model, measure it (or reuse its stored measurement), price
it, and log what it measured; an arm whose calls failed is reported as not measured, not priced."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from pipeline.economics import figures as economics
from pipeline.economics.decision import ArmInputs, arm_route
from pipeline.economics.routes import Ownership
from pipeline.economics.stats import per_label_table
from pipeline.experiment.arms import Arm
from pipeline.experiment.load import flatten
from pipeline.measure.scoring import read_predictions
from pipeline.recipe.arm_models import ArmModels
from pipeline.recipe.evaluate import evaluate
from pipeline.recipe.inputs import RunInputs
from pipeline.recipe.stages import machine, stage_key
from pipeline.report.charts import confusion_matrix_png
from pipeline.report.format import not_measured
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
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # arm name -> its priced metrics


def run_arm(exp: Experiment, arm: Arm, tags: dict[str, str] | None = None) -> dict[str, float] | None:
    """One arm as a child run: get its model, measure it (or reuse a stored measurement), price it. None where
    more of its calls failed than `eval.max_failed_rate` allows: its run ends FAILED, saying why. `tags` add to
    or replace the arm run's own (a learning-curve point is not an arm of the compare)."""
    with tracking.start_run(arm.name, nested=True) as child:
        mlflow.set_tags({"arm": arm.name, "arm_kind": arm.kind, "backend": arm.backend,
                         "model": exp.models.display_name(arm), tracking.ROLE_TAG: "arm",
                         tracking.RUN_TYPE_TAG: tracking.EVALUATION_RUN, **(tags or {})})
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
                        **({"paired_with": [round(float(s), 6) for s in partner]} if partner is not None else {}),
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
        exp.console.print(f"{arm.name:<12} {exp.primary} {100 * metrics[exp.primary]:.1f}%  "
                          + stop_words(stopped_by, metrics, len(exp.rows), exp.primary)
                          + f"invalid {100 * metrics['invalid_rate']:.1f}%  "
                          + (f"failed {100 * metrics['failed_rate']:.1f}%  " if metrics.get("failed_rate") else "")
                          + f"{metrics['prompt_tokens_mean']:.0f} prompt tokens  p50 {metrics['latency_p50_ms']:.0f} ms")
        exp.measured[arm.name] = metrics
        return metrics


def pair_partner_scores(exp: Experiment, arm: Arm):
    """The compare pair's other arm's row scores on the test rows, where `arm` is in the pair, evaluates
    sequentially (its primary is a mean over rows) and the other arm was measured before it; else None."""
    pair = (exp.plan.pair.baseline, exp.plan.pair.candidate)
    if arm.eval.sequential is None or arm.name not in pair or pair[0] == pair[1] or not exp.kind(arm).row_mean:
        return None
    other = exp.outcomes.get(pair[1] if arm.name == pair[0] else pair[0])
    return None if other is None else other.score.astype(float)


def stop_words(stopped_by: str, metrics: dict[str, float], rows: int, primary: str = "accuracy") -> str:
    """How many rows the arm was scored on and why it stopped there, for the console."""
    evaluated = int(metrics.get("rows_evaluated", rows))
    why = {"interval": f"its {primary} was known", "decided": "the pair was decided"}.get(stopped_by)
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
    renderer = exp.renderer(template, exp.models.tokenizer_for(arm))
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
    owned = arm_route(arm_inputs(exp, arm, metrics), pricing)
    metrics["fixed_cost_usd"] = owned.one_off_usd
    if arm.trains:
        metrics["labelling_cost_usd"] = owned.labelling_usd
    primary = exp.primary
    metrics.update(economics.arm_figures(arm.price, metrics, pricing, primary))
    answers = read_predictions(predictions)
    rows = exp.outcomes[arm.name] = economics.ArmRows.from_predictions(answers, exp.labels)
    metrics.update(economics.arm_intervals(rows, arm.price, metrics, pricing, exp.cfg.stats, primary))
    if f"{primary}_cs_low" in metrics:  # evaluated sequentially: only the confidence sequence holds at its stop
        metrics[f"{primary}_ci_low"] = metrics[f"{primary}_cs_low"]
        metrics[f"{primary}_ci_high"] = metrics[f"{primary}_cs_high"]
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(predictions))
    if rows.predicted is not None:
        log_label_scores(exp, arm, rows)
    kind = exp.kind(arm)
    if kind.item_table:  # per_field.json
        tracking.log_table(kind.per_item_table(answers), kind.item_table)


def log_label_scores(exp: Experiment, arm: Arm, rows: economics.ArmRows) -> None:
    """Per-label precision, recall and F1 (a table) and the confusion matrix (an image) on the arm's run."""
    tracking.log_table(per_label_table(rows.predicted, rows.gold, exp.labels), "per_label.json")
    image = exp.run_dir / arm.name / "confusion_matrix.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    confusion_matrix_png(rows.predicted, rows.gold, exp.labels, image, f"{arm.name}: gold (rows) vs predicted")
    mlflow.log_artifact(str(image))


def arm_inputs(exp: Experiment, arm: Arm, metrics: dict[str, float], n_train: int | None = None) -> ArmInputs:
    """A measured arm as the money math takes it: its price, figures, what owning its route involves (trained on
    `n_train` labelled rows: default the run's train split)."""
    own = Ownership(arm.kind, arm.fixed_cost_usd, arm.finetune.search_runs if arm.finetune else 1,
                    arm.finetune.retrain_every_months if arm.finetune else None,
                    len(exp.task.splits["train"]) if n_train is None else n_train,
                    int(metrics.get("rows_evaluated", len(exp.rows))), labelling_usd(exp, arm, metrics))
    return ArmInputs(arm.name, arm.price, metrics, own, exp.primary)


def labelling_usd(exp: Experiment, arm: Arm, metrics: dict[str, float]) -> float | None:
    """A distilled arm's labels: its teacher's measured cost a call times the calls that labelled its rows
    (None: labels at the per-example rate)."""
    teacher = arm.finetune.labels_from if arm.finetune else None
    if not teacher or "teacher_calls" not in metrics:
        return None
    return exp.measured.get(teacher, {}).get("cost_per_call_usd", 0.0) * metrics["teacher_calls"]
