"""`roi run`: the whole prompt-vs-fine-tune experiment, top to bottom.

config -> data -> prompts -> model -> for each arm: (train) + evaluate + price -> break-even -> report.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import mlflow
import yaml

from pipeline import tracking
from pipeline.arms import Call, finetune, generate_calls
from pipeline.config import ExperimentConfig, flatten, project_root_for
from pipeline.costing import break_even, cost_per_call, finetune_fixed_cost, ratio
from pipeline.data import eval_rows, load_task
from pipeline.evaluation import latency_stats, parse_label, score
from pipeline.models import load_model, load_tokenizer, pick_dtype, resolve_source
from pipeline.prompts import PromptRenderer, load_template, pick_examples
from pipeline.report import Summary, plot_cost_vs_volume, print_table, summary_markdown


def _prediction_rows(texts, golds, calls: list[Call], predicted: list[int], labels: list[str]) -> list[dict]:
    return [
        {"input": text, "gold": gold, "raw_output": call.output,
         "parsed_label": labels[p] if p >= 0 else None, "correct": p >= 0 and labels[p] == gold,
         "prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
         "latency_ms": round(call.latency_ms, 3)}
        for text, gold, call, p in zip(texts, golds, calls, predicted)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def run_experiment(cfg: ExperimentConfig, config_path: Path, raw_config: dict, console) -> Summary:
    """Run every configured arm on the same test rows, log to MLflow, and return the summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # 1. Everything that can be wrong with the inputs is found before the model loads.
    task = load_task(cfg.task, cfg.data)
    rows = eval_rows(task, cfg.eval.limit, cfg.data.seed)
    texts, golds = rows["text"], rows["label"]
    labels = task.label_names
    gold_ids = [labels.index(g) for g in golds]
    templates = {arm: load_template(getattr(cfg.prompts, arm)) for arm in cfg.arms}
    source = resolve_source(cfg.model)
    tracking.connect(cfg.experiment)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    examples = pick_examples(task.splits["train"]["text"], task.splits["train"]["label"], cfg.prompts.few_shot_k,
                             cfg.data.seed)
    renderers = {arm: PromptRenderer(templates[arm], tokenizer, task.labels, examples) for arm in cfg.arms}

    run_dir = cfg.output_dir / cfg.experiment / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    dtype = pick_dtype(cfg.model.dtype)
    console.print(f"[bold]{cfg.experiment}[/bold]: {task.name} ({len(task.splits['train'])} train, "
                  f"{len(rows)} test rows), model {source.display_name} ({str(dtype).removeprefix('torch.')}), "
                  f"arms {', '.join(cfg.arms)}")

    arm_metrics: dict[str, dict[str, float]] = {}
    with tracking.start_run(f"{cfg.experiment}-{time.strftime('%m%d-%H%M%S')}") as parent:
        mlflow.set_tags({tracking.ROLE_TAG: "parent", "task": task.name, "model": source.display_name})
        tracking.log_params({
            **flatten(raw_config), "dataset_hash": task.content_hash,
            "git_commit": tracking.git_commit(project_root_for(config_path)), "n_eval": len(rows),
            "n_train": len(task.splits["train"]), "dtype": str(dtype),
        })
        mlflow.log_artifact(str(config_path), artifact_path="config")
        (run_dir / "resolved_config.yaml").write_text(yaml.safe_dump(raw_config, sort_keys=False))
        mlflow.log_artifact(str(run_dir / "resolved_config.yaml"), artifact_path="config")
        tracking.log_dataset(task.splits["train"].to_pandas(), str(task.files["train"]), f"{task.name}-train", "train")
        tracking.log_dataset(rows.to_pandas(), str(task.files.get("test", task.files["train"])),
                             f"{task.name}-test", "eval")

        t0 = time.perf_counter()
        base_model = load_model(source, dtype, cfg.model.trust_remote_code)
        console.print(f"model loaded in {time.perf_counter() - t0:.1f} s")

        # Prompt arms use the base weights, so they run before LoRA layers are injected.
        for arm in sorted(cfg.arms, key=lambda a: a == "finetuned"):
            with tracking.start_run(arm, nested=True) as child:
                mlflow.set_tags({"arm": arm, tracking.ROLE_TAG: "arm"})
                renderer = renderers[arm]
                prompt_uri = tracking.register_prompt(
                    f"{cfg.experiment}-{arm}", templates[arm].registry_template(),
                    {"arm": arm, "file": templates[arm].path.name, "sha": templates[arm].sha}, child.info.run_id)
                mlflow.log_params({"prompt_uri": prompt_uri, "prompt_file": templates[arm].path.name,
                                   "few_shot_k": cfg.prompts.few_shot_k})
                model = base_model
                extra: dict[str, float] = {}
                if arm == "finetuned":
                    train = task.splits["train"]
                    console.print(f"fine-tuning LoRA r={cfg.finetune.lora.r} on {len(train)} rows ...")
                    train_dtype = dtype if cfg.finetune.dtype == "auto" else pick_dtype(cfg.finetune.dtype)
                    result = finetune(
                        base_model.to(train_dtype), tokenizer, [renderer.render(t) for t in train["text"]],
                        list(train["label"]), cfg.finetune, train_dtype, run_dir / "finetuned", report_to=["mlflow"],
                    )
                    extra = {"train_time_s": result.train_time_s, "train_tokens": float(result.train_tokens),
                             "train_loss": result.train_loss}
                    mlflow.log_artifacts(str(result.adapter_dir), artifact_path="adapter")
                    console.print(f"trained in {result.train_time_s:.1f} s "
                                  f"({result.train_tokens / result.train_time_s:.0f} tokens/s)")
                    # Served as deployed: LoRA folded into the weights, so calls pay no adapter overhead.
                    model = result.model.merge_and_unload()

                prompts = [renderer.render(t) for t in texts]
                prefix = renderer.static_prefix() if cfg.eval.prefix_cache else ""
                with Progress(TextColumn(f"evaluating {arm:<10}"), BarColumn(), MofNCompleteColumn(),
                              TimeRemainingColumn(), console=console, transient=True) as bar:
                    job = bar.add_task(arm, total=len(prompts))
                    calls, seconds = generate_calls(
                        model, tokenizer, prompts, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                        warmup=min(cfg.eval.warmup, len(prompts)), progress=lambda n: bar.advance(job, n),
                        prefix=prefix)
                predicted = [parse_label(c.output, labels) for c in calls]
                if prefix and cfg.eval.uncached_sample:
                    # The same calls without the cache: what the prefix cache saves, and a check it changes nothing.
                    sample = prompts[: cfg.eval.uncached_sample]
                    plain, _ = generate_calls(model, tokenizer, sample, cfg.eval.batch_size, cfg.eval.max_new_tokens)
                    extra["latency_p50_ms_uncached"] = latency_stats([c.latency_ms for c in plain])["latency_p50_ms"]
                    extra["prefix_cache_agreement"] = sum(
                        a.output == b.output for a, b in zip(plain, calls)) / len(plain)

                metrics = score(predicted, gold_ids, len(labels))
                metrics.update(latency_stats([c.latency_ms for c in calls]))
                metrics["prompt_tokens_mean"] = sum(c.prompt_tokens for c in calls) / len(calls)
                metrics["completion_tokens_mean"] = sum(c.completion_tokens for c in calls) / len(calls)
                metrics["throughput_calls_per_s"] = len(calls) / seconds
                prefix_tokens = float(len(tokenizer(renderer.static_prefix(), add_special_tokens=False)["input_ids"]))
                metrics["prefix_tokens"] = prefix_tokens
                metrics["cost_per_call_usd"] = cost_per_call(
                    cfg.pricing.arms[arm], metrics["prompt_tokens_mean"], metrics["completion_tokens_mean"],
                    metrics["throughput_calls_per_s"], cached_prompt_tokens=prefix_tokens)
                metrics.update(extra)
                mlflow.log_metrics(metrics)

                predictions = run_dir / arm / "predictions.jsonl"
                predictions.parent.mkdir(exist_ok=True)
                _write_jsonl(predictions, _prediction_rows(texts, golds, calls, predicted, labels))
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
        )
        (run_dir / "roi_summary.md").write_text(summary_markdown(summary), encoding="utf-8")
        plot_cost_vs_volume(summary, run_dir / "cost_vs_volume.png")
        mlflow.log_artifact(str(run_dir / "roi_summary.md"))
        mlflow.log_artifact(str(run_dir / "cost_vs_volume.png"))
    print_table(summary, console)
    console.print(f"outputs in {run_dir}; MLflow run {summary.run_id} in {tracking.tracking_uri()}")
    return summary


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
