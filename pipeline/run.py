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

from pipeline import economics, interrupts, tracking
from pipeline.arm_models import ArmModels
from pipeline.arms import Arm, resolved_config, resolved_params
from pipeline.backends.base import Backend
from pipeline.config import ExperimentConfig, flatten, project_root_for
from pipeline.costing import finetune_fixed_cost
from pipeline.data import TaskData, eval_rows, load_task
from pipeline.evaluation import PARSERS, call_metrics, read_predictions
from pipeline.measure import Measurement, measure
from pipeline.prompts import PromptRenderer, PromptTemplate, load_template, pick_examples
from pipeline.report import Summary, plot_cost_vs_volume, print_table, summary_markdown
from pipeline.report_facts import build_facts, plot_sensitivity, save_facts, write_report
from pipeline.stages import StageStore, machine, stage_key
from pipeline.stats import confusion_matrix_png, per_label_table


@dataclass
class Experiment:
    """What every arm of one run shares: the config, the data, the store and where outputs go."""

    cfg: ExperimentConfig
    task: TaskData
    rows: Any  # the test rows every arm is scored on
    examples: list[dict[str, str]]
    templates: dict[str, PromptTemplate]
    models: ArmModels
    store: StageStore
    run_dir: Path
    console: Any
    notes: list[str] = field(default_factory=list)
    parent_run_id: str = ""
    outcomes: dict[str, Any] = field(default_factory=dict)  # arm name -> economics.ArmRows

    @property
    def labels(self) -> list[str]:
        return self.task.label_names


def run_experiment(cfg: ExperimentConfig, config_path: Path, raw_config: dict, console, force: bool = False,
                   overrides: list[str] = ()) -> Summary:
    """Run every configured arm on the same test rows, log to MLflow, and return the summary."""
    exp = prepare(cfg, console, force)  # everything that can be wrong with the inputs is found here
    experiment_id = tracking.connect(cfg.experiment)
    console.print(f"[bold]{cfg.experiment}[/bold]: {exp.task.name} ({len(exp.task.splits['train'])} train, "
                  f"{len(exp.rows)} test rows), arms {', '.join(a.name for a in cfg.resolved_arms)}")
    results: dict[str, dict[str, float]] = {}
    with tracking.start_run(run_name(config_path, overrides, time.localtime())) as parent:
        exp.parent_run_id = parent.info.run_id
        log_parent_inputs(exp, config_path, raw_config)
        for arm in cfg.resolved_arms:
            results[arm.name] = run_arm(exp, arm)
        parent_metrics, sensitivity = roi_metrics(exp, results)
        summary = summarise(exp, results, parent_metrics, parent.info.run_id)
        log_parent_results(exp, summary, sensitivity, parent.info.run_name)
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


def prepare(cfg: ExperimentConfig, console, force: bool) -> Experiment:
    """Read the data, templates, adapters and keys; fail with one line before any model loads."""
    task = load_task(cfg.task, cfg.data)
    rows = eval_rows(task, cfg.eval.limit, cfg.data.seed)
    templates = {arm.name: load_template(arm.prompt) for arm in cfg.resolved_arms}
    models = ArmModels(cfg, console)
    models.check_inputs()
    train = task.splits["train"]
    examples = pick_examples(train["text"], train["label"], cfg.prompts.few_shot_k, cfg.data.seed)
    # Second resolution plus a random suffix: two runs started in the same second get their own folder.
    run_dir = cfg.output_dir / cfg.experiment / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    store = StageStore(cfg.output_dir / "stages", recompute=force)
    return Experiment(cfg, task, rows, examples, templates, models, store, run_dir, console,
                      notes=task.notes + models.notes)


def log_parent_inputs(exp: Experiment, config_path: Path, raw_config: dict) -> None:
    """The parent run's tags, params (the config as resolved), config files and datasets."""
    cfg, task = exp.cfg, exp.task
    mlflow.set_tags({tracking.ROLE_TAG: "parent", "task": task.name,
                     "model": ", ".join(sorted({exp.models.display_name(a) for a in cfg.resolved_arms}))})
    tracking.log_params({
        **resolved_params(cfg), "experiment": cfg.experiment, "dataset_hash": task.content_hash,
        "git_commit": tracking.git_commit(project_root_for(config_path)), "n_eval": len(exp.rows),
        "n_train": len(task.splits["train"]), "decoding": cfg.eval.decoding, "latency_repeats": cfg.eval.repeats,
    })
    if exp.notes:
        mlflow.set_tag("notes", "\n".join(exp.notes))
    mlflow.log_artifact(str(config_path), artifact_path="config")
    # As written (with the command line's overrides) and as resolved (every default filled in).
    (exp.run_dir / "config_as_written.yaml").write_text(yaml.safe_dump(raw_config, sort_keys=False))
    (exp.run_dir / "resolved_config.yaml").write_text(yaml.safe_dump(resolved_config(cfg), sort_keys=False))
    mlflow.log_artifact(str(exp.run_dir / "config_as_written.yaml"), artifact_path="config")
    mlflow.log_artifact(str(exp.run_dir / "resolved_config.yaml"), artifact_path="config")
    tracking.log_dataset(task.splits["train"].to_pandas(), str(task.files["train"]), f"{task.name}-train", "train")
    tracking.log_dataset(exp.rows.to_pandas(), str(task.files.get("test", task.files["train"])),
                         f"{task.name}-test", "eval")


def run_arm(exp: Experiment, arm: Arm) -> dict[str, float]:
    """One arm as a child run: get its model, measure it (or reuse a stored measurement), price it."""
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
        key = stage_key("eval", data=exp.task.content_hash, limit=exp.cfg.eval.limit, seed=exp.cfg.data.seed,
                        prompt=template.sha, examples=exp.examples, eval=arm.eval.model_dump(),
                        model=exp.models.identity(arm), adapter=exp.models.adapter_key(arm, exp, template),
                        **({"quantize": arm.quantize} if arm.quantize else {}),
                        # A local arm's timings hold only on the machine and libraries that measured them.
                        **({"machine": machine()} if arm.backend == "local" else {}))
        done = exp.store.load(key)
        if done is not None:
            # Same inputs, same code: the stored evaluation stands; say so in the run.
            metrics, predictions = done["metrics"], exp.store.path(key) / "predictions.jsonl"
            mlflow.set_tags({"reused": "true", "reused_stage": key})
            exp.console.print(f"{arm.name:<12} reused stored results ({key})")
        else:
            backend, metrics = exp.models.backend(arm, exp, template)
            predictions = exp.run_dir / arm.name / "predictions.jsonl"
            try:
                metrics.update(evaluate(exp, arm, backend, template, predictions))
            finally:
                backend.close()
            exp.store.finish(key, {"metrics": metrics}, {"predictions.jsonl": predictions})
        exp.models.log_adapter(arm, exp, template)
        if metrics.get("tokens_estimated"):
            mlflow.set_tag("tokens", "estimated")
        # Prices are not part of a stage: stored measurements are re-priced on every run.
        metrics["fixed_cost_usd"] = fixed_cost(exp.cfg, arm, metrics, len(exp.task.splits["train"]))
        metrics.update(economics.arm_figures(arm, metrics, exp.cfg.pricing))
        rows = exp.outcomes[arm.name] = economics.ArmRows.read(predictions, exp.labels)
        metrics.update(economics.arm_intervals(rows, arm, metrics, exp.cfg))
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(predictions))
        log_label_scores(exp, arm, rows)
        exp.console.print(f"{arm.name:<12} accuracy {100 * metrics['accuracy']:.1f}%  "
                          f"invalid {100 * metrics['invalid_rate']:.1f}%  "
                          + (f"failed {100 * metrics['failed_rate']:.1f}%  " if metrics.get("failed_rate") else "")
                          + f"{metrics['prompt_tokens_mean']:.0f} prompt tokens  p50 {metrics['latency_p50_ms']:.0f} ms")
        return metrics


def log_label_scores(exp: Experiment, arm: Arm, rows: economics.ArmRows) -> None:
    """Per-label precision, recall and F1 (a table) and the confusion matrix (an image) on the arm's run."""
    tracking.log_table(per_label_table(rows.predicted, rows.gold, exp.labels), "per_label.json")
    image = exp.run_dir / arm.name / "confusion_matrix.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    confusion_matrix_png(rows.predicted, rows.gold, exp.labels, image, f"{arm.name}: gold (rows) vs predicted")
    mlflow.log_artifact(str(image))


def evaluate(exp: Experiment, arm: Arm, backend: Backend, template: PromptTemplate,
             predictions: Path) -> dict[str, float]:
    """Measure every test row on the backend, parse and score it; predictions are written as they come
    (so they are kept on Ctrl-C), one row per test row, in test-row order."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    renderer = PromptRenderer(template, exp.models.tokenizer_for(arm), exp.task.labels, exp.examples)
    texts, golds = exp.rows["text"], exp.rows["label"]
    prompts = [renderer.prompt(t) for t in texts]
    predictions.parent.mkdir(parents=True, exist_ok=True)
    parse, predicted = PARSERS[arm.eval.parser], []
    with predictions.open("w", encoding="utf-8") as out, \
            Progress(TextColumn(f"evaluating {arm.name:<12}"), BarColumn(), MofNCompleteColumn(),
                     TimeRemainingColumn(), console=exp.console, transient=True) as bar:
        job = bar.add_task(arm.name, total=len(prompts))

        def on_calls(calls) -> None:
            interrupts.check()
            for call in calls:
                i = len(predicted)
                predicted.append(parse(call.output, exp.labels))
                out.write(json.dumps(prediction_row(i, texts[i], golds[i], call, predicted[i], exp.labels),
                                     ensure_ascii=False) + "\n")
            out.flush()
            bar.advance(job, len(calls))

        try:
            timed = measure(backend, prompts, warmup=min(arm.eval.warmup, len(prompts)), repeats=arm.eval.repeats,
                            on_calls=on_calls)
        except KeyboardInterrupt:
            out.flush()
            mlflow.log_artifact(str(predictions))  # the rows finished before the interrupt
            raise
    batch1 = _batch1_sample(backend, prompts, arm)
    metrics = call_metrics(timed, predicted, [exp.labels.index(g) for g in golds], exp.labels, batch1)
    if batch1 is not None:
        _record_batch1_latencies(predictions, batch1.calls)
    metrics["prefix_tokens"] = float(renderer.static_prefix_tokens()) if renderer.tokenizer else 0.0
    if backend.tokens_estimated:
        metrics["tokens_estimated"] = 1.0
    if backend.retries_total is not None:
        metrics["retries_total"] = float(backend.retries_total)
    metrics.update(_uncached_sample(backend, prompts, arm, timed, at_batch1=batch1 is not None))
    return metrics


def _uncached_sample(backend: Backend, prompts, arm: Arm, timed: Measurement, at_batch1: bool) -> dict[str, float]:
    """The first rows again without the prefix cache: what the cache saves, and a check it changes nothing.
    Timed as `latency_p50_ms` is (one call at a time where the arm's latency is), so the two compare."""
    plain = backend.uncached() if arm.eval.uncached_sample else None
    if plain is None:
        return {}
    plain = (plain.at_batch_size(1) or plain) if at_batch1 else plain
    sample = prompts[: arm.eval.uncached_sample]
    # Warmed like the cached pass, so neither pays one-off costs the other does not.
    calls = measure(plain, sample, warmup=min(arm.eval.warmup, len(sample)), repeats=arm.eval.repeats).calls
    from pipeline.evaluation import latency_stats

    return {"latency_p50_ms_uncached": latency_stats([c.latency_ms for c in calls])["latency_p50_ms"],
            "prefix_cache_agreement": sum(a.output == b.output for a, b in zip(calls, timed.calls)) / len(calls)}


def _batch1_sample(backend: Backend, prompts, arm: Arm) -> Measurement | None:
    """The first rows again one call at a time (a local arm that batches): what one interactive caller waits
    (the latency percentiles), and the throughput, so the cost, of serving without batching."""
    one_at_a_time = backend.at_batch_size(1) if arm.eval.batch_size > 1 and arm.eval.batch1_sample else None
    if one_at_a_time is None:
        return None
    sample = prompts[: arm.eval.batch1_sample]
    return measure(one_at_a_time, sample, warmup=min(arm.eval.warmup, len(sample)),
                   repeats=arm.eval.repeats)


def _record_batch1_latencies(predictions: Path, calls: list) -> None:
    """Each sampled row's latency at batch 1 beside its latency in the batched pass (`latency_ms`)."""
    rows = read_predictions(predictions)
    for row, call in zip(rows, calls):
        row["latency_ms_batch1"] = round(call.latency_ms, 3)
    partial = predictions.with_suffix(".jsonl.tmp")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    partial.replace(predictions)  # an interrupt leaves the old file whole


def prediction_row(row_id: int, text: str, gold: str, call, parsed: int, labels: list[str]) -> dict:
    row = {"row_id": row_id, "input": text, "gold": gold, "raw_output": call.output,
           "parsed_label": labels[parsed] if parsed >= 0 else None,
           "correct": parsed >= 0 and labels[parsed] == gold,
           "prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
           "cached_tokens": call.cached_tokens, "latency_ms": round(call.latency_ms, 3)}
    if call.error:
        row["error"] = call.error
    if call.retries:
        row["retries"] = call.retries
    return row


def fixed_cost(cfg: ExperimentConfig, arm: Arm, metrics: dict[str, float], n_train: int) -> float:
    """One-off cost of an arm's route: given, or for a fine-tune its measured training (time on priced
    hardware, or tokens at a provider's training price) and labelling."""
    if arm.fixed_cost_usd is not None:
        return arm.fixed_cost_usd
    if arm.kind != "finetuned":
        return cfg.pricing.prompt_fixed_usd
    rates = cfg.pricing.finetune
    labelling = n_train * rates.labelling_usd_per_example
    if rates.training_usd_per_mtok is not None:
        return metrics.get("train_tokens", 0.0) * rates.training_usd_per_mtok / 1e6 + labelling
    return finetune_fixed_cost(metrics.get("train_time_s", 0.0), rates.usd_per_hour, n_train,
                               rates.labelling_usd_per_example)


def roi_metrics(exp: Experiment, arms: dict[str, dict[str, float]]) -> tuple[dict[str, float], list[dict]]:
    """Parent-run metrics for the compare pair (fixed cost, both break-evens with intervals, payback,
    McNemar's p, token reduction, prompt gain) and the break-evens' sensitivity rows."""
    cfg = exp.cfg
    out: dict[str, float] = {}
    baseline, candidate, naive = cfg.pair.baseline, cfg.pair.candidate, cfg.pair.naive
    if baseline and naive and baseline != naive:
        out["prompt_gain_pts"] = 100 * (arms[baseline]["accuracy"] - arms[naive]["accuracy"])
        out.update(economics.prompt_pair_metrics(exp.outcomes, baseline, naive))
    if not candidate:
        return out, []
    out["finetune_fixed_cost_usd"] = arms[candidate]["fixed_cost_usd"]
    if not baseline:
        return out, []
    by_name = {a.name: a for a in cfg.resolved_arms}
    pair = economics.Pair(by_name[baseline], by_name[candidate], arms[baseline], arms[candidate])
    out["token_reduction_x"] = economics.token_reduction(arms[baseline], arms[candidate])
    out.update(economics.pair_metrics(pair, exp.outcomes, cfg))
    return out, economics.break_even_sensitivity(pair, cfg.pricing)


def summarise(exp: Experiment, arms: dict[str, dict[str, float]], parent: dict[str, float], run_id: str) -> Summary:
    cfg = exp.cfg
    return Summary(
        experiment=cfg.experiment, task=exp.task.name,
        model=", ".join(dict.fromkeys(exp.models.display_name(a) for a in cfg.resolved_arms)),
        n_eval=len(exp.rows), arms=arms, parent=parent, baseline_arm=cfg.pair.baseline,
        candidate_arm=cfg.pair.candidate, monthly_calls=cfg.pricing.monthly_calls, run_id=run_id,
        decoding=cfg.eval.decoding, parser=cfg.eval.parser, repeats=cfg.eval.repeats, notes=exp.notes,
        error_cost_usd=cfg.pricing.error_cost_usd,
    )


def log_parent_results(exp: Experiment, summary: Summary, sensitivity: list[dict], run_name: str) -> None:
    """The parent's figures (a figure that never happens is a tag `...=never`, not a metric), its arms table,
    the summary and the report with its plots and facts (under `report/`, for `roi report --out`)."""
    finite = {k: v for k, v in summary.parent.items() if math.isfinite(v)}
    mlflow.log_metrics(finite)
    never = sorted(k for k, v in summary.parent.items() if math.isinf(v))
    if never:
        mlflow.set_tags({k: "never" for k in never})
    if summary.has_pair and summary.break_even_calls is None:
        mlflow.set_tag("break_even", "never")
    tracking.log_table(arms_table(summary), "arms.json")
    (exp.run_dir / "roi_summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    mlflow.log_artifact(str(exp.run_dir / "roi_summary.md"))
    report_dir = exp.run_dir / "report"
    report_dir.mkdir(exist_ok=True)
    images = {"cost_vs_volume": report_dir / "cost_vs_volume.png", "sensitivity": report_dir / "sensitivity.png"}
    plot_cost_vs_volume(summary, images["cost_vs_volume"])
    mlflow.log_artifact(str(images["cost_vs_volume"]))
    plot_sensitivity(sensitivity, summary.parent, images["sensitivity"])
    for arm in summary.arms:
        images[f"confusion_{arm}"] = exp.run_dir / arm / "confusion_matrix.png"
    facts = build_facts(exp, summary, sensitivity, run_name)
    save_facts(facts, report_dir / "facts.json")
    for path in write_report(facts, images, report_dir):
        mlflow.log_artifact(str(path), artifact_path="report")
    mlflow.log_artifact(str(report_dir / "facts.json"), artifact_path="report")
    for key, path in images.items():
        if key.startswith("confusion_") and path.is_file():
            mlflow.log_artifact(str(path), artifact_path=f"report/{key}")
    exp.console.print(f"report: {report_dir / 'roi_report.html'}")


def arms_table(summary: Summary) -> list[dict[str, Any]]:
    """One row per arm, rounded for reading: what the parent run's table artifact shows."""
    rows = []
    for arm, m in summary.arms.items():
        role = "baseline" if arm == summary.baseline_arm else "candidate" if arm == summary.candidate_arm else ""
        rows.append({"arm": arm, "role": role, "accuracy_pct": round(100 * m["accuracy"], 1),
                     "prompt_tokens": round(m["prompt_tokens_mean"], 1),
                     "latency_p50_ms": round(m["latency_p50_ms"], 1),
                     "cost_per_1k_calls_usd": float(f"{m['cost_per_1k_calls_usd']:.4g}"),
                     "fixed_cost_usd": float(f"{summary.fixed_cost(arm):.4g}")})
    return rows
