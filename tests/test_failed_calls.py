"""Failed calls are not measurements: `roi run` against a real local OpenAI-compatible server
(tests/fake_openai.py) where some rows fail on every attempt. Past `eval.max_failed_rate` the arm is not
measured (exit 3, its run FAILED, no figure from failures); below it, its figures come from answered calls."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, roi, sqlite_store
from fake_openai import FakeOpenAI, Faults
from pipeline.backends.preflight import PROBE_TEXT
from pipeline.task.splits import eval_rows, load_task, task_config_for_folder

pytestmark = pytest.mark.model  # `roi run` in a subprocess: left out of make test-fast

TASK = ROOT / "datasets" / "support_tickets"
PRICE = {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60}  # no `kind`: its keys say per_token


def _texts(limit: int) -> list[str]:
    return list(eval_rows(load_task(task_config_for_folder(TASK)), limit, 0)["text"])


def _config(tmp_path: Path, limit: int, servers: dict[str, str]) -> Path:
    """One API arm per server (`arm name -> base_url`), API only: nothing loads but a tokenizer."""
    prompts = iter(["engineered", "naive"])
    models, arms = {}, []
    for i, (arm, url) in enumerate(servers.items()):
        models[f"api{i}"] = {"backend": "openai", "base_url": url, "model": "fake", "max_retries": 0,
                             "timeout_s": 5.0, "max_concurrency": 4}
        arms.append({"name": arm, "model": f"api{i}", "prompt": next(prompts), "price": PRICE})
    path = tmp_path / "api.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": "failed-calls",
        "task": {"path": str(TASK), "labels": "labels.json", "splits": {"train": "train.jsonl", "test": "test.jsonl"}},
        "models": models, "arms": arms, "eval": {"warmup": 0, "limit": limit},
        "output_dir": str(tmp_path / "runs")}))
    return path


def _run(tmp_path: Path, config: Path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"), PYTHONUNBUFFERED="1")
    return roi("run", str(config), env=env, cwd=tmp_path, timeout=300)


def _runs(tmp_path: Path) -> tuple[object, dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("failed-calls").experiment_id],
                              order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("roi.role") == "parent")
    arms = {r.data.tags["arm"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return parent, arms


def _evaluated(server: FakeOpenAI) -> list[dict]:
    return [r for r in server.requests if r.get("input") != PROBE_TEXT]


def _predictions(tmp_path: Path, arm: str) -> list[dict]:
    folder = max((tmp_path / "runs" / "failed-calls").glob("*"))
    return [json.loads(line) for line in (folder / arm / "predictions.jsonl").read_text().splitlines()]


FIGURES_FROM_CALLS = ("latency", "throughput", "tokens", "cost", "ttft", "replicas")


def test_an_arm_with_30_percent_failed_calls_is_not_measured_and_the_others_stand(tmp_path):
    texts = _texts(20)
    doomed = set(texts[7:13])  # 6 of 20, in the middle of the run
    with FakeOpenAI(Faults(always_fail=doomed)) as failing, FakeOpenAI() as healthy:
        config = _config(tmp_path, 20, {"engineered-api": failing.base_url, "naive-api": healthy.base_url})
        result = _run(tmp_path, config)
        failed_on_server = sum(r["fault"] == "fail" for r in _evaluated(failing))
        assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
        assert failed_on_server == 6
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("roi: arm engineered-api not measured: 6 of 20 calls failed (first error: "
                               "InternalServerError: ") and "503" in line, result.stderr

        parent, arms = _runs(tmp_path)
        bad, good = arms["engineered-api"], arms["naive-api"]
        assert bad.info.status == "FAILED" and good.info.status == "FINISHED" and parent.info.status == "FINISHED"
        assert "InternalServerError" in bad.data.tags["failure"] and "503" in bad.data.tags["failure"]
        assert bad.data.metrics == {"calls": 20.0, "failed_calls": 6.0, "failed_rate": 0.3}
        assert not [k for k in bad.data.metrics if any(f in k for f in FIGURES_FROM_CALLS)]
        assert len(_predictions(tmp_path, "engineered-api")) == 20  # the failed rows are kept
        assert good.data.metrics["failed_rate"] == 0.0 and good.data.metrics["latency_calls_timed"] == 20
        assert good.data.metrics["cost_per_1k_calls_usd"] > 0 and good.data.metrics["latency_p50_ms"] > 0
        # Left out of the compare: no prompt gain against an arm that was not measured.
        assert "prompt_gain_pts" not in parent.data.metrics
        run_dir = max((tmp_path / "runs" / "failed-calls").glob("*"))
        summary_md = (run_dir / "roi_summary.md").read_text()
        assert "Not measurable: engineered-api was not measured (6 of 20 calls failed" in summary_md
        assert "| engineered-api | not measured: 6 of 20 calls failed (first error: InternalServerError" in summary_md
        assert "not measured: 6 of 20 calls failed" in (run_dir / "report" / "roi_report.html").read_text()
        assert "not measured: 6 of 20 calls failed" in result.stdout
        # Only the measured arm is a finished stage: the next run measures the failed one again.
        assert len(list((tmp_path / "runs" / "stages").glob("*/done.json"))) == 1
        failing.faults.always_fail = set()
        before_failing, before_healthy = len(_evaluated(failing)), len(_evaluated(healthy))
        again = _run(tmp_path, config)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert len(_evaluated(failing)) - before_failing == 20 and len(_evaluated(healthy)) == before_healthy
    assert "naive-api    reused stored results" in again.stdout


def test_roi_report_shows_an_arm_that_was_not_measured(tmp_path):
    import mlflow

    from pipeline.report.summary import summary_from_runs, verdict
    from pipeline.tracking.mlflow_store import find_parent_run

    texts = _texts(10)
    with FakeOpenAI(Faults(always_fail=set(texts[:5]))) as failing, FakeOpenAI() as healthy:
        result = _run(tmp_path, _config(tmp_path, 10, {"engineered-api": failing.base_url,
                                                       "naive-api": healthy.base_url}))
    assert result.returncode == 3, result.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    summary = summary_from_runs(*find_parent_run("failed-calls"))
    assert list(summary.arms) == ["naive-api"]
    assert summary.not_measured["engineered-api"].startswith("not measured: 5 of 10 calls failed (first error: ")
    assert verdict(summary).startswith("Not measurable: engineered-api was not measured (5 of 10 calls failed")


def test_two_percent_failed_calls_are_kept_out_of_every_figure(tmp_path):
    texts = _texts(50)
    with FakeOpenAI(Faults(always_fail={texts[25]})) as server:
        result = _run(tmp_path, _config(tmp_path, 50, {"engineered-api": server.base_url}))
        requests = _evaluated(server)
        answered = [server.usage_of(r["body"], server.answer(r["body"], r["input"])) for r in requests
                    if r["fault"] is None]
        failed_on_server = sum(r["fault"] == "fail" for r in requests)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, arms = _runs(tmp_path)
    arm = arms["engineered-api"]
    m = arm.data.metrics
    assert arm.info.status == "FINISHED" and "failure" not in arm.data.tags
    assert failed_on_server == 1 and len(answered) == 49
    assert (m["calls"], m["failed_calls"], m["failed_rate"]) == (50, failed_on_server, 0.02)
    assert m["latency_calls_timed"] == len(answered)
    # Tokens are the server's own counts of the calls it answered: the failed row's local estimate is not in them.
    prompt = statistics.mean(u["prompt_tokens"] for u in answered)
    completion = statistics.mean(u["completion_tokens"] for u in answered)
    assert m["prompt_tokens_mean"] == pytest.approx(prompt) and m["completion_tokens_mean"] == pytest.approx(completion)
    rows = _predictions(tmp_path, "engineered-api")
    assert statistics.mean(r["prompt_tokens"] for r in rows) != pytest.approx(prompt)  # all rows would differ
    assert m["cost_per_1k_calls_usd"] == pytest.approx(1000 * (prompt * 0.15 + completion * 0.60) / 1e6)
    ok = [r["latency_ms"] for r in rows if "error" not in r]
    assert m["latency_p50_ms"] == pytest.approx(statistics.median(ok), abs=0.01)
    assert m["accuracy"] <= 49 / 50  # the failed row still counts as wrong
