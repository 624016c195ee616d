"""A tiny but real `roi run`: real model, real training steps, real MLflow store."""

import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY, free_port, roi, sqlite_store, wait_for_health

CONTRACT = ["accuracy", "macro_f1", "invalid_rate", "prompt_tokens_mean", "completion_tokens_mean", "latency_p50_ms",
            "latency_p95_ms", "latency_p99_ms", "throughput_calls_per_s", "cost_per_call_usd"]


def _client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _artifacts(client, run_id: str, path: str = "") -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, path)}


ARMS = ("naive", "engineered", "finetuned", "finetuned-int8")
BOX_USD_PER_HOUR = 0.08925  # the catalog's cpu-2core preset, which experiments/default.yaml prices every arm at


def test_one_parent_four_arms_with_every_contract_metric(tiny_run):
    env, tmp, result, _ = tiny_run
    client = _client(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("support-triage")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("roi.role") == "parent"]
    children = [r for r in runs if "arm" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    arms = {r.data.tags["arm"]: r for r in children}
    assert set(arms) == set(ARMS)
    for arm, run in arms.items():
        m = run.data.metrics
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert set(CONTRACT) <= set(m), (arm, set(CONTRACT) - set(m))
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1 and 0 <= m["invalid_rate"] <= 1
        assert m["throughput_calls_per_s"] > 0 and m["cost_per_call_usd"] > 0
        assert 1 <= m["completion_tokens_mean"] <= 8  # TINY's eval.max_new_tokens
        assert run.info.status == "FINISHED"
    tokens = {arm: run.data.metrics["prompt_tokens_mean"] for arm, run in arms.items()}
    assert tokens["engineered"] > tokens["naive"] > tokens["finetuned"] > 0
    ft = arms["finetuned"].data.metrics
    assert ft["train_time_s"] > 0 and ft["train_tokens"] > 0
    assert "latency_p50_ms_uncached" in arms["engineered"].data.metrics

    pm = parent.data.metrics
    assert pm["token_reduction_x"] == pytest.approx(tokens["engineered"] / tokens["finetuned"])
    acc = {arm: run.data.metrics["accuracy"] for arm, run in arms.items()}
    assert pm["prompt_gain_pts"] == pytest.approx(100 * (acc["engineered"] - acc["naive"]))
    # Built once: people ($100/h: 24 h for a fine-tune, 8 h for a prompt), the training on a cpu-2core box, and
    # the 6 evaluation calls' busy time on one at the arm's measured throughput.
    def evaluation(m):
        return 6 / m["throughput_calls_per_s"] / 3600 * BOX_USD_PER_HOUR

    eng = arms["engineered"].data.metrics
    assert pm["finetune_fixed_cost_usd"] == pytest.approx(
        24 * 100 + ft["train_time_s"] / 3600 * BOX_USD_PER_HOUR + evaluation(ft))
    assert ft["fixed_cost_usd"] == pm["finetune_fixed_cost_usd"]  # on the child too, where `roi report` reads it
    assert eng["fixed_cost_usd"] == pytest.approx(8 * 100 + evaluation(eng))
    params = parent.data.params
    assert len(params["dataset_hash"]) == 64 and params["git_commit"]
    assert params["finetune.max_steps"] == "3" and params["eval.limit"] == "6"
    assert {i.dataset.name for i in parent.inputs.dataset_inputs} >= {"support_tickets-train", "support_tickets-test"}


def test_deployment_costs_break_evens_and_intervals_by_hand(tiny_run):
    """Every self-hosted arm is priced as an always-on cpu-2core box ($0.08925/h x 730 h), sized for 3x the
    average arrival rate at 100,000 calls a month, at the throughput those arrivals can batch within 2 s; each
    route's total over 12 months adds people, training, evaluation and (with the $0.20 error cost) wrong answers."""
    env, tmp, _, _ = tiny_run
    client = _client(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("support-triage").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("roi.role") == "parent")
    arms = {r.data.tags["arm"]: r.data.metrics for r in runs if "arm" in r.data.tags}
    peak_rate = 100_000 / (730 * 3600) * 3
    for arm, m in arms.items():
        window_s = (2000 - m["latency_p95_ms_batched"]) / 1000  # how long the first call may wait for a batch
        forms = window_s > 0 and peak_rate >= (m["batch_size"] - 1) / window_s
        usable = max(m["throughput_calls_per_s"], m["throughput_calls_per_s_batch1"]) if forms \
            else m["throughput_calls_per_s_batch1"]
        replicas = max(1, math.ceil(peak_rate / (usable * 0.6)))
        assert m["replicas"] == replicas and m["monthly_cost_usd"] == pytest.approx(replicas * BOX_USD_PER_HOUR * 730)
        assert m["cost_per_1k_calls_usd"] == pytest.approx(10 * m["monthly_cost_usd"] / 1000)
        # A misrouted ticket costs $0.20 (the default experiment's pricing.error_cost_usd).
        assert m["quality_adjusted_cost_per_call_usd"] == pytest.approx(
            m["cost_per_call_usd"] + (1 - m["accuracy"]) * 0.20)
        assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
        assert m["throughput_calls_per_s_batch1"] > 0 and "cost_per_1k_calls_usd_batch1" in m
    base, cand = arms["engineered"], arms["finetuned"]
    pm, tags = parent.data.metrics, parent.data.tags
    # Over 12 months: the one-offs (no retraining configured) and 12 months of running.
    tco_base = base["fixed_cost_usd"] + 12 * base["monthly_cost_usd"]  # the one-offs are checked above
    tco_cand = cand["fixed_cost_usd"] + 12 * cand["monthly_cost_usd"]
    assert pm["tco_baseline_usd"] == pytest.approx(tco_base) and pm["tco_candidate_usd"] == pytest.approx(tco_cand)
    errors = {a: 12 * 100_000 * (1 - arms[a]["accuracy"]) * 0.20 for a in ("engineered", "finetuned")}
    assert pm["quality_adjusted_tco_baseline_usd"] == pytest.approx(tco_base + errors["engineered"])
    assert pm["quality_adjusted_tco_candidate_usd"] == pytest.approx(tco_cand + errors["finetuned"])
    assert tags["verdict"] in ("fine-tune", "keep prompting", "too close to call") and tags["verdict_reason"]
    # The break-even volume is where the candidate's horizon total drops below the baseline's for good, as
    # cost_curves.json draws the two.
    curves = json.loads(next((tmp / "runs" / "support-triage").glob("*/report/cost_curves.json")).read_text())
    horizon = {r["name"]: r["horizon_usd"] for r in curves["routes"]}
    cheaper = [c < b for b, c in zip(horizon["engineered"], horizon["finetuned"])]
    if tags.get("break_even_monthly_calls") == "never":
        assert not cheaper[-1]
    else:
        crossing = pm["break_even_monthly_calls"]
        assert all(ok for v, ok in zip(curves["volumes"], cheaper) if v > crossing * (1 + 1e-6))
        below = [ok for v, ok in zip(curves["volumes"], cheaper) if v < crossing * (1 - 1e-6)]
        assert crossing == 0 or not below[-1]  # just before the last cheaper range: dearer or tied
    # McNemar's exact p, by hand from the two arms' rows: 2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2).
    rows = {}
    for arm in ("engineered", "finetuned"):
        run = next(r for r in runs if r.data.tags.get("arm") == arm)
        path = Path(client.download_artifacts(run.info.run_id, "predictions.jsonl", str(tmp / f"mc-{arm}")))
        rows[arm] = [json.loads(line)["correct"] for line in path.read_text().splitlines()]
    b = sum(e and not f for e, f in zip(rows["engineered"], rows["finetuned"]))
    c = sum(f and not e for e, f in zip(rows["engineered"], rows["finetuned"]))
    n = b + c
    expected = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)
    assert pm["mcnemar_p"] == pytest.approx(expected)
    # The int8 arm: the same adapter (trained once), its weights in int8 take less memory.
    int8 = arms["finetuned-int8"]
    assert int8["train_time_s"] == pytest.approx(cand["train_time_s"])
    assert int8["model_bytes"] < 0.8 * cand["model_bytes"]


def test_artifacts_predictions_summary_plot_adapter_and_prompts(tiny_run):
    env, tmp, result, _ = tiny_run
    import mlflow

    client = _client(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("support-triage")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("roi.role") == "parent")
    assert {"roi_summary.md", "cost_vs_volume.png", "config"} <= _artifacts(client, parent.info.run_id)
    for run in (r for r in runs if "arm" in r.data.tags):
        assert "predictions.jsonl" in _artifacts(client, run.info.run_id)
        local = Path(client.download_artifacts(run.info.run_id, "predictions.jsonl", str(tmp)))
        rows = [json.loads(line) for line in local.read_text().splitlines()]
        assert len(rows) == 6 and [r["row_id"] for r in rows] == list(range(6))
        # The logged percentiles are those of the calls as recorded, row by row: latency at batch 1 (what one
        # caller waits) where the arm batches, beside the batched pass's; throughput is the batched pass's.
        metrics = run.data.metrics
        batched = [r["latency_ms"] for r in rows]
        one_at_a_time = [r["latency_ms_batch1"] for r in rows]  # every arm here batches 8 and samples all 6 rows
        assert metrics["latency_p50_ms_batched"] == pytest.approx(statistics.median(batched), abs=1e-3)
        assert metrics["latency_calls_timed"] == 6 and metrics["throughput_calls_per_s_batch1"] > 0
        assert metrics["latency_p50_ms"] == pytest.approx(statistics.median(one_at_a_time), abs=1e-3)
        assert metrics["latency_p99_ms"] == pytest.approx(np.percentile(one_at_a_time, 99), abs=1e-3)
        assert run.data.metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 6)
        for row in rows:
            assert {"input", "gold", "raw_output", "parsed_label", "prompt_tokens", "completion_tokens",
                    "latency_ms"} <= set(row)
        assert run.data.params["prompt_uri"].startswith(f"prompts:/support-triage-{run.data.tags['arm']}/")
        prompt = mlflow.genai.load_prompt(run.data.params["prompt_uri"])
        assert prompt.template
    ft = next(r for r in runs if r.data.tags.get("arm") == "finetuned")
    assert "adapter/adapter_model.safetensors" in _artifacts(client, ft.info.run_id, "adapter")
    # The Trainer's own loss curve (one point per step at logging_steps=1), not a figure roi logs itself.
    curve = client.get_metric_history(ft.info.run_id, "train/loss")
    assert sorted(m.step for m in curve) == [1, 2, 3] and all(math.isfinite(m.value) and m.value > 0 for m in curve)
    png = next((tmp / "runs" / "support-triage").glob("*/report/cost_vs_volume.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_layout_for_comparing_arms(tiny_run):
    """What the MLflow UI reads: the experiment's kind and arms view, a per-arm table and the prompts on the
    parent, the Trainer's dump kept out of params and its curves under `train/`."""
    env, tmp, result, _ = tiny_run
    client = _client(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("support-triage")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.roi-arms"])
    columns = json.loads(view["state"])["selectedColumns"]
    assert columns[:4] == ["metrics.`accuracy`", "metrics.`latency_p50_ms`", "metrics.`prompt_tokens_mean`",
                           "metrics.`cost_per_1k_calls_usd`"]
    link = f"/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=roi-arms"
    assert link in result.stdout.replace("\n", "")

    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("roi.role") == "parent")
    arms = {r.data.tags["arm"]: r for r in runs if "arm" in r.data.tags}
    # The run name says which config, when, and what was overridden (output_dir changes no result).
    name = parent.info.run_name
    assert re.match(r"default \d\d-\d\d \d\d:\d\d eval\.limit=6 ", name)
    assert "finetune.max_steps=3" in name and "output_dir" not in name
    for arm, run in arms.items():
        assert run.info.run_name == arm and run.data.tags["mlflow.runType"] == "evaluation"
        m = run.data.metrics
        assert m["cost_per_1k_calls_usd"] == pytest.approx(1000 * m["cost_per_call_usd"])
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "arms.json", str(tmp))).read_text())
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert list(rows) == list(ARMS)
    assert rows["finetuned"]["role"] == "candidate" and rows["engineered"]["role"] == "baseline"
    for arm, run in arms.items():
        assert rows[arm]["accuracy_pct"] == round(100 * run.data.metrics["accuracy"], 1)
        assert rows[arm]["cost_per_1k_calls_usd"] == pytest.approx(run.data.metrics["cost_per_1k_calls_usd"], rel=1e-3)
    linked = {p["name"] for p in json.loads(parent.data.tags["mlflow.linkedPrompts"])}
    assert linked == {f"support-triage-{arm}" for arm in arms}

    # The fine-tuned arm: its own settings as params, no Trainer or model-config dump, no unprefixed curves.
    ft, engineered = arms["finetuned"].data, arms["engineered"].data
    assert {k for k in ft.params if not k.startswith("finetune.")} == set(engineered.params)
    # About 40 keys of its own (eval.*, finetune.*, prompt): the Trainer's full configuration is ~170.
    assert ft.params["finetune.max_steps"] == "3" and len(ft.params) < 50
    assert not {"accelerator_config", "_name_or_path", "per_device_train_batch_size"} & set(ft.params)
    own = {k for k in ft.metrics if not k.startswith("train/")}
    assert own - set(engineered.metrics) == {"train_time_s", "train_tokens", "train_loss", "train_steps",
                                             "labelling_cost_usd"}
    assert {"train/loss", "train/grad_norm", "train/learning_rate"} <= set(ft.metrics)
    assert not {"train/train_loss", "train/total_flos"} & set(ft.metrics)  # the end summary is left out
    args = json.loads(Path(client.download_artifacts(arms["finetuned"].info.run_id, "trainer/training_args.json",
                                                     str(tmp))).read_text())
    assert args["max_steps"] == 3 and args["report_to"] in ([], "none", ["none"])


def test_terminal_table_and_roi_report(tiny_run):
    env, tmp, result, _ = tiny_run
    for arm in ARMS:
        assert arm in result.stdout
    assert "break-even" in result.stdout
    # The GGUF is dequantised once: the fine-tuned arms train and merge into in-memory copies of that base.
    assert result.stdout.count("model loaded") == 1, result.stdout
    report = roi("report", "--experiment", "support-triage", env=env)
    assert report.returncode == 0, report.stderr
    assert "finetuned" in report.stdout and "break-even" in report.stdout
    md = roi("report", "experiments/default.yaml", "--markdown", env=env)
    summary = next((tmp / "runs" / "support-triage").glob("*/roi_summary.md")).read_text()
    assert md.returncode == 0 and md.stdout == summary
    # The forwardable report, rendered again from what the run kept: the same file as the run wrote.
    out = tmp / "report-again"
    again = roi("report", "--experiment", "support-triage", "--out", str(out), env=env)
    assert again.returncode == 0, again.stderr
    original = next((tmp / "runs" / "support-triage").glob("*/report/roi_report.html")).read_text()
    assert (out / "roi_report.html").read_text() == original
    assert (out / "roi_report.md").is_file() and (out / "cost_vs_volume.png").is_file()
    missing = roi("report", "--run-id", "0" * 32, "--out", str(out), env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr


def test_roi_compare_puts_runs_side_by_side(tiny_run, tmp_path):
    env, tmp, _, _ = tiny_run
    client = _client(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("support-triage").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("roi.role") == "parent")
    result = roi("compare", parent.info.run_id, "--experiment", "support-triage", "--out", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "roi_compare.md").read_text().splitlines()
    assert len(lines) == 4 and "break-even (calls)" in lines[0]  # header, rule, two rows (the same run twice)
    reduction = f"{parent.data.metrics['token_reduction_x']:.1f}x"
    assert all(reduction in line and "never" in line for line in lines[2:])
    import csv

    rows = list(csv.DictReader((tmp_path / "roi_compare.csv").open()))
    assert [r["candidate"] for r in rows] == ["finetuned", "finetuned"]


def test_an_exported_adapter_is_evaluated_with_its_training_cost(tiny_run, tmp_path):
    env, tmp, _, _ = tiny_run
    client = _client(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("support-triage").experiment_id])
    trained = next(r for r in runs if r.data.tags.get("arm") == "finetuned")
    # What a user gets from the MLflow UI: the run's `adapter` artifact folder.
    adapter = Path(client.download_artifacts(trained.info.run_id, "adapter", str(tmp_path)))
    record = json.loads((adapter / "training.json").read_text())
    assert record["base_model"] == "SmolLM2-135M-Instruct"
    env2 = dict(env, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"))
    result = roi("run", str(ROOT / "experiments" / "default.yaml"), "eval.limit=6", "arms=[finetuned]",
                 "eval.batch1_sample=0", "eval.uncached_sample=0", f"finetune.adapter={adapter}",
                 f"output_dir={tmp_path / 'runs'}", env=env2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fine-tuning" not in result.stdout and "using the given adapter" in result.stdout
    client2 = _client(env2["MLFLOW_TRACKING_URI"])
    runs2 = client2.search_runs([client2.get_experiment_by_name("support-triage").experiment_id])
    given = next(r for r in runs2 if r.data.tags.get("arm") == "finetuned")
    assert given.data.tags["adapter_source"] == str(adapter)
    assert given.data.metrics["train_time_s"] == pytest.approx(trained.data.metrics["train_time_s"])
    # Same adapter, same rows: the same answers as the run that trained it.
    assert given.data.metrics["accuracy"] == pytest.approx(trained.data.metrics["accuracy"])


def test_constrained_decoding_and_repeated_timing_end_to_end(tmp_path, roi_env):
    env = roi_env
    result = roi("run", str(ROOT / "experiments" / "default.yaml"), "eval.limit=6", "arms=[naive]",
                 "eval.decoding=constrained", "eval.repeats=2", "eval.warmup=1", "eval.uncached_sample=0",
                 f"output_dir={tmp_path / 'runs'}", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = _client(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("support-triage").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("roi.role") == "parent")
    naive = next(r for r in runs if r.data.tags.get("arm") == "naive").data.metrics
    # The naive prompt's free answers are never a bare label (0% valid in the demo); constrained, all are.
    assert naive["invalid_rate"] == 0.0
    assert "latency_repeat_cv" in naive  # logged only when two timed passes ran
    assert parent.data.params["decoding"] == "constrained" and parent.data.params["latency_repeats"] == "2"
    summary = next((tmp_path / "runs" / "support-triage").glob("*/roi_summary.md")).read_text()
    assert "Decoding: constrained" in summary and "2 timed passes" in summary
    assert "decoding constrained" in result.stdout and "across 2 passes" in result.stdout
    report = roi("report", "--experiment", "support-triage", "--markdown", env=env)
    assert report.returncode == 0 and report.stdout == summary


def test_report_on_an_empty_store_is_one_line(roi_env):
    result = roi("report", "--experiment", "nothing-here", env=roi_env)
    assert result.returncode == 2 and "nothing-here" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_tracking_server_fails_fast_naming_the_uri(roi_env):
    uri = f"http://127.0.0.1:{free_port()}"
    roi_env["MLFLOW_TRACKING_URI"] = uri
    started = time.perf_counter()
    result = roi("run", "experiments/default.yaml", "eval.limit=2", env=roi_env)
    assert result.returncode == 2
    assert uri in result.stderr and result.stderr.count("\n") == 1
    assert time.perf_counter() - started < 60


def test_run_logs_to_a_real_mlflow_server_over_http(tmp_path, roi_env):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", sqlite_store(tmp_path / "server.db"),
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(uri, server, 90, "mlflow server")
        roi_env["MLFLOW_TRACKING_URI"] = uri
        result = roi("run", "experiments/default.yaml", "arms=[naive]", "eval.limit=3", "eval.warmup=0",
                     "eval.max_new_tokens=4", "eval.batch1_sample=0", "eval.uncached_sample=0",
                     f"output_dir={tmp_path / 'runs'}", env=roi_env)
        assert result.returncode == 0, result.stderr[-2000:]
        client = _client(uri)
        runs = client.search_runs([client.get_experiment_by_name("support-triage").experiment_id])
        naive = next(r for r in runs if r.data.tags.get("arm") == "naive")
        assert math.isfinite(naive.data.metrics["accuracy"])
        assert "predictions.jsonl" in _artifacts(client, naive.info.run_id)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_credentials_in_the_tracking_uri_never_reach_the_output(roi_env):
    from pipeline.tracking.mlflow_store import redact

    assert redact("http://ana:s3cret@127.0.0.1:5000/x") == "http://ana:***@127.0.0.1:5000/x"
    assert redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    roi_env["MLFLOW_TRACKING_URI"] = f"http://ana:s3cret@127.0.0.1:{free_port()}"
    result = roi("run", "experiments/default.yaml", "eval.limit=2", env=roi_env)
    assert result.returncode == 2 and "s3cret" not in result.stderr + result.stdout
    assert "ana:***@127.0.0.1" in result.stderr


def test_arm_order_changes_no_figure(tiny_run, tmp_path):
    """Each arm gets its own model state: the fine-tune trains on a fresh copy of the base, so running
    it first (before the prompt arms on the shared base) changes no answer."""
    env, tmp, _, _ = tiny_run
    env2 = dict(env, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"))
    # The answers come from the main pass: the batch-1 and uncached samples are not needed here.
    result = roi("run", str(ROOT / "experiments" / "default.yaml"), *TINY, "arms=[finetuned,engineered,naive]",
                 "eval.batch1_sample=0", "eval.uncached_sample=0", f"output_dir={tmp_path / 'runs'}", env=env2,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def answers(folder: Path) -> dict[str, list[str]]:
        run_dir = next((folder / "runs" / "support-triage").glob("*"))
        return {arm: [json.loads(line)["raw_output"] for line in (run_dir / arm / "predictions.jsonl").open()]
                for arm in ("naive", "engineered", "finetuned")}

    assert answers(tmp_path) == answers(tmp)
