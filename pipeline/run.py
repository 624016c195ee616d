"""`roi run`: the whole prompt-vs-fine-tune experiment, top to bottom.

config -> data -> prompts -> for each arm: (train) + evaluate + price -> break-even -> report.
Finished stages (an arm's evaluation, the trained adapter) are stored under a hash of their
inputs and reused by the next run of the same experiment unless `--force` is given.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import mlflow
import yaml

from pipeline import interrupts, tracking
from pipeline.arms import Call, LabelConstraint, finetune, generate_calls, load_adapter, stop_token_ids
from pipeline.config import ExperimentConfig, flatten, project_root_for
from pipeline.costing import break_even, cost_per_call, finetune_fixed_cost, ratio
from pipeline.data import eval_rows, hash_files, load_task
from pipeline.evaluation import latency_stats, parse_label, score
from pipeline.models import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_RECORD, check_adapter, load_model,
                             load_tokenizer, pick_dtype, resolve_source)
from pipeline.prompts import PromptRenderer, count_tokens, load_template, pick_examples
from pipeline.report import Summary, plot_cost_vs_volume, print_table, summary_markdown
from pipeline.stages import StageStore, stage_key


def run_experiment(cfg: ExperimentConfig, config_path: Path, raw_config: dict, console, force: bool = False) -> Summary:
    """Run every configured arm on the same test rows, log to MLflow, and return the summary."""
    # Everything that can be wrong with the inputs is found before any model loads.
    task = load_task(cfg.task, cfg.data)
    rows = eval_rows(task, cfg.eval.limit, cfg.data.seed)
    labels = task.label_names
    templates = {arm: load_template(getattr(cfg.prompts, arm)) for arm in cfg.arms}
    source = resolve_source(cfg.model)
    given_adapter = cfg.finetune.adapter if "finetuned" in cfg.arms else None
    adapter_record = check_adapter(given_adapter, source, cfg.model.trust_remote_code) if given_adapter else {}
    tracking.connect(cfg.experiment)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    examples = pick_examples(task.splits["train"]["text"], task.splits["train"]["label"], cfg.prompts.few_shot_k,
                             cfg.data.seed)
    renderers = {arm: PromptRenderer(templates[arm], tokenizer, task.labels, examples) for arm in cfg.arms}
    dtype = pick_dtype(cfg.model.dtype)
    train_dtype = dtype if cfg.finetune.dtype == "auto" else pick_dtype(cfg.finetune.dtype)

    run_dir = cfg.output_dir / cfg.experiment / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    store = StageStore(cfg.output_dir / "stages")
    model_id = {"model": cfg.model.name_or_path, "gguf": source.gguf_file, "dtype": str(dtype)}
    if given_adapter:
        finetune_key = stage_key("adapter", files=hash_files([given_adapter / ADAPTER_CONFIG,
                                                              given_adapter / ADAPTER_WEIGHTS]), **model_id)
    else:
        finetune_key = stage_key("finetune", data=task.content_hash, prompt=templates.get("finetuned") and
                                 templates["finetuned"].sha, finetune=cfg.finetune.model_dump(),
                                 train_dtype=str(train_dtype), **model_id)
    notes = []
    if given_adapter and "train_time_s" not in adapter_record:
        notes.append(f"the given adapter {given_adapter} has no {TRAINING_RECORD}: its training cost is "
                     "unknown and counted as $0")
    console.print(f"[bold]{cfg.experiment}[/bold]: {task.name} ({len(task.splits['train'])} train, "
                  f"{len(rows)} test rows), model {source.display_name} ({str(dtype).removeprefix('torch.')}), "
                  f"arms {', '.join(cfg.arms)}")

    base = _LazyModel(lambda: load_model(source, dtype, cfg.model.trust_remote_code), console)
    arm_metrics: dict[str, dict[str, float]] = {}
    with tracking.start_run(f"{cfg.experiment}-{time.strftime('%m%d-%H%M%S')}") as parent:
        mlflow.set_tags({tracking.ROLE_TAG: "parent", "task": task.name, "model": source.display_name})
        tracking.log_params({
            **flatten(raw_config), "dataset_hash": task.content_hash,
            "git_commit": tracking.git_commit(project_root_for(config_path)), "n_eval": len(rows),
            "n_train": len(task.splits["train"]), "dtype": str(dtype), "decoding": cfg.eval.decoding,
            "latency_repeats": cfg.eval.repeats,
        })
        if notes:
            mlflow.set_tag("notes", "\n".join(notes))
        mlflow.log_artifact(str(config_path), artifact_path="config")
        (run_dir / "resolved_config.yaml").write_text(yaml.safe_dump(raw_config, sort_keys=False))
        mlflow.log_artifact(str(run_dir / "resolved_config.yaml"), artifact_path="config")
        tracking.log_dataset(task.splits["train"].to_pandas(), str(task.files["train"]), f"{task.name}-train", "train")
        tracking.log_dataset(rows.to_pandas(), str(task.files.get("test", task.files["train"])),
                             f"{task.name}-test", "eval")

        # Prompt arms use the base weights, so they run before LoRA layers are injected.
        for arm in sorted(cfg.arms, key=lambda a: a == "finetuned"):
            with tracking.start_run(arm, nested=True) as child:
                mlflow.set_tags({"arm": arm, tracking.ROLE_TAG: "arm"})
                template, renderer = templates[arm], renderers[arm]
                prompt_uri = tracking.register_prompt(
                    f"{cfg.experiment}-{arm}", template.registry_template(),
                    {"arm": arm, "file": template.path.name, "sha": template.sha}, child.info.run_id)
                mlflow.log_params({"prompt_uri": prompt_uri, "prompt_file": template.path.name,
                                   "few_shot_k": cfg.prompts.few_shot_k})
                eval_key = stage_key("eval", arm=arm, data=task.content_hash, limit=cfg.eval.limit,
                                     seed=cfg.data.seed, prompt=template.sha, examples=examples,
                                     eval=cfg.eval.model_dump(), adapter=arm == "finetuned" and finetune_key,
                                     **model_id)
                done = None if force else store.load(eval_key)
                if done is not None:
                    # Same inputs, same code: the stored evaluation stands; say so in the run.
                    metrics = done["metrics"]
                    predictions = store.path(eval_key) / "predictions.jsonl"
                    mlflow.set_tags({"reused": "true", "reused_stage": eval_key})
                    console.print(f"{arm:<10} reused stored results ({eval_key})")
                else:
                    model, extra = base.get(), {}
                    if arm == "finetuned" and given_adapter:
                        model, extra = _given_adapter_model(given_adapter, adapter_record, base, console)
                    elif arm == "finetuned":
                        model, extra = _finetuned_model(cfg, task, renderer, tokenizer, base, train_dtype, store,
                                                        finetune_key, force, console, source.display_name)
                    predictions = run_dir / arm / "predictions.jsonl"
                    metrics = _evaluate(arm, model, tokenizer, renderer, rows, labels, cfg, predictions, console)
                    metrics.update(extra)
                    store.finish(eval_key, {"metrics": metrics}, {"predictions.jsonl": predictions})
                if arm == "finetuned":
                    adapter_dir = given_adapter or store.path(finetune_key) / "adapter"
                    if (adapter_dir / ADAPTER_WEIGHTS).is_file():
                        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
                # Prices are not part of a stage: a re-run with new prices re-prices stored measurements.
                metrics["cost_per_call_usd"] = cost_per_call(
                    cfg.pricing.arms[arm], metrics["prompt_tokens_mean"], metrics["completion_tokens_mean"],
                    metrics["throughput_calls_per_s"], cached_prompt_tokens=metrics["prefix_tokens"])
                mlflow.log_metrics(metrics)
                mlflow.log_artifact(str(predictions))
                arm_metrics[arm] = metrics
                console.print(f"{arm:<10} accuracy {100 * metrics['accuracy']:.1f}%  "
                              f"invalid {100 * metrics['invalid_rate']:.1f}%  "
                              f"{metrics['prompt_tokens_mean']:.0f} prompt tokens  "
                              f"p50 {metrics['latency_p50_ms']:.0f} ms")

        parent_metrics = roi_metrics(cfg, arm_metrics, len(task.splits["train"]))
        mlflow.log_metrics({k: v for k, v in parent_metrics.items() if not math.isnan(v)})
        if "finetuned" in arm_metrics and "break_even_calls" not in parent_metrics:
            mlflow.set_tag("break_even", "never")
        summary = Summary(
            experiment=cfg.experiment, task=task.name, model=source.display_name, n_eval=len(rows),
            arms={a: arm_metrics[a] for a in cfg.arms}, parent=parent_metrics,
            baseline_arm=cfg.pricing.baseline_arm, monthly_calls=cfg.pricing.monthly_calls,
            prompt_fixed_usd=cfg.pricing.prompt_fixed_usd, run_id=parent.info.run_id,
            decoding=cfg.eval.decoding, repeats=cfg.eval.repeats, notes=notes,
        )
        (run_dir / "roi_summary.md").write_text(summary_markdown(summary), encoding="utf-8")
        plot_cost_vs_volume(summary, run_dir / "cost_vs_volume.png")
        mlflow.log_artifact(str(run_dir / "roi_summary.md"))
        mlflow.log_artifact(str(run_dir / "cost_vs_volume.png"))
    print_table(summary, console)
    console.print(f"outputs in {run_dir}; MLflow run {summary.run_id} in {tracking.redact(tracking.tracking_uri())}")
    return summary


class _LazyModel:
    """The base model, loaded on first use: a re-run whose stages are all stored loads nothing."""

    def __init__(self, load: Callable[[], Any], console):
        self._load, self._console, self._model = load, console, None

    def get(self) -> Any:
        if self._model is None:
            t0 = time.perf_counter()
            self._model = self._load()
            self._console.print(f"model loaded in {time.perf_counter() - t0:.1f} s")
        return self._model


def _given_adapter_model(adapter_dir: Path, record: dict, base: _LazyModel, console) -> tuple[Any, dict[str, float]]:
    """The base model with an adapter trained elsewhere, merged for serving; its training record, if any."""
    console.print(f"using the given adapter {adapter_dir}")
    mlflow.set_tags({"adapter_source": str(adapter_dir)})
    model = load_adapter(base.get(), adapter_dir)
    stats = {k: float(record.get(k, 0.0)) for k in ("train_time_s", "train_tokens", "train_loss")}
    return model.merge_and_unload(), stats


def _finetuned_model(cfg, task, renderer, tokenizer, base: _LazyModel, train_dtype, store: StageStore, key: str,
                     force: bool, console, base_name: str) -> tuple[Any, dict[str, float]]:
    """The fine-tuned model, merged for serving: trained now (resuming a killed run) or a stored adapter."""
    done = None if force else store.load(key)
    if done is not None:
        console.print(f"reusing the trained adapter ({key})")
        mlflow.set_tags({"reused_adapter": "true", "reused_stage": key})
        model = load_adapter(base.get(), store.path(key) / "adapter")
        stats = done["train"]
    else:
        if force:
            store.forget(key)
        train = task.splits["train"]
        console.print(f"fine-tuning LoRA r={cfg.finetune.lora.r} on {len(train)} rows ...")
        result = finetune(
            base.get().to(train_dtype), tokenizer, [renderer.render(t) for t in train["text"]], list(train["label"]),
            cfg.finetune, train_dtype, store.work_dir(key), report_to=["mlflow"],
            on_resume=lambda checkpoint: console.print(f"resuming training from {checkpoint}"),
        )
        if result.resumed_from:
            mlflow.set_tag("resumed_from_checkpoint", Path(result.resumed_from).name)
        stats = {"train_time_s": result.train_time_s, "train_tokens": float(result.train_tokens),
                 "train_loss": result.train_loss}
        # Travels with the adapter (and its MLflow artifact): reusing it elsewhere keeps its base and cost.
        (result.adapter_dir / TRAINING_RECORD).write_text(json.dumps({"base_model": base_name, **stats}, indent=1))
        store.finish(key, {"train": stats})
        shutil.rmtree(store.path(key) / "trainer", ignore_errors=True)  # checkpoints are only for resuming
        console.print(f"trained in {result.train_time_s:.1f} s "
                      f"({result.train_tokens / result.train_time_s:.0f} tokens/s)")
        model = result.model
    # Served as deployed: LoRA folded into the weights, so calls pay no adapter overhead.
    return model.merge_and_unload(), stats


def _evaluate(arm: str, model, tokenizer, renderer: PromptRenderer, rows, labels: list[str], cfg: ExperimentConfig,
              predictions: Path, console) -> dict[str, float]:
    """Generate, parse and score every test row; predictions are written as they come (kept on Ctrl-C)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    texts, golds = rows["text"], rows["label"]
    prompts = [renderer.render(t) for t in texts]
    prefix = renderer.static_prefix() if cfg.eval.prefix_cache else ""
    constraint = (LabelConstraint(tokenizer, labels, stop_token_ids(model, tokenizer))
                  if cfg.eval.decoding == "constrained" else None)
    predictions.parent.mkdir(parents=True, exist_ok=True)
    predicted: list[int] = []
    with predictions.open("w", encoding="utf-8") as out, \
            Progress(TextColumn(f"evaluating {arm:<10}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                     console=console, transient=True) as bar:
        job = bar.add_task(arm, total=len(prompts))

        def on_batch(batch: list[Call]) -> None:
            interrupts.check()
            for call in batch:
                i = len(predicted)
                predicted.append(parse_label(call.output, labels))
                out.write(json.dumps(_prediction_row(texts[i], golds[i], call, predicted[i], labels),
                                     ensure_ascii=False) + "\n")
            out.flush()
            bar.advance(job, len(batch))

        try:
            timed = generate_calls(model, tokenizer, prompts, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                                   warmup=min(cfg.eval.warmup, len(prompts)), progress=on_batch, prefix=prefix,
                                   constraint=constraint, repeats=cfg.eval.repeats)
        except KeyboardInterrupt:
            out.flush()
            mlflow.log_artifact(str(predictions))  # the rows finished before the interrupt
            raise
    calls = timed.calls
    metrics = score(predicted, [labels.index(g) for g in golds], len(labels))
    metrics.update(latency_stats([c.latency_ms for c in calls], timed.pass_p50_ms))
    metrics["prompt_tokens_mean"] = sum(c.prompt_tokens for c in calls) / len(calls)
    metrics["completion_tokens_mean"] = sum(c.completion_tokens for c in calls) / len(calls)
    metrics["throughput_calls_per_s"] = len(calls) / timed.seconds
    metrics["prefix_tokens"] = float(count_tokens(tokenizer, prefix)) if prefix else 0.0
    if prefix and cfg.eval.uncached_sample:
        # The same calls without the cache: what the prefix cache saves, and a check it changes nothing.
        sample = prompts[: cfg.eval.uncached_sample]
        plain = generate_calls(model, tokenizer, sample, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                               constraint=constraint, repeats=cfg.eval.repeats).calls
        metrics["latency_p50_ms_uncached"] = latency_stats([c.latency_ms for c in plain])["latency_p50_ms"]
        metrics["prefix_cache_agreement"] = sum(a.output == b.output for a, b in zip(plain, calls)) / len(plain)
    return metrics


def _prediction_row(text: str, gold: str, call: Call, parsed: int, labels: list[str]) -> dict:
    return {"input": text, "gold": gold, "raw_output": call.output,
            "parsed_label": labels[parsed] if parsed >= 0 else None,
            "correct": parsed >= 0 and labels[parsed] == gold,
            "prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
            "latency_ms": round(call.latency_ms, 3)}


def roi_metrics(cfg: ExperimentConfig, arms: dict[str, dict[str, float]], n_train: int) -> dict[str, float]:
    """Parent-run metrics: fixed cost, break-even, payback, token reduction and prompt gain."""
    out: dict[str, float] = {}
    if "engineered" in arms and "naive" in arms:
        out["prompt_gain_pts"] = 100 * (arms["engineered"]["accuracy"] - arms["naive"]["accuracy"])
    if "finetuned" not in arms:
        return out
    ft = arms["finetuned"]
    fixed = finetune_fixed_cost(ft["train_time_s"], cfg.pricing.finetune.usd_per_hour, n_train,
                                cfg.pricing.finetune.labelling_usd_per_example)
    out["finetune_fixed_cost_usd"] = fixed
    if "engineered" in arms:
        out["token_reduction_x"] = ratio(arms["engineered"]["prompt_tokens_mean"], ft["prompt_tokens_mean"])
    base = arms.get(cfg.pricing.baseline_arm)
    if base is not None:
        result = break_even(cfg.pricing.prompt_fixed_usd, base["cost_per_call_usd"], fixed, ft["cost_per_call_usd"],
                            cfg.pricing.monthly_calls)
        if not result.never:
            out["break_even_calls"] = result.calls
            out["payback_months"] = result.payback_months
    return out
