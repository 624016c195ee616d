"""A team's tracking server, for real: PostgreSQL + `mlflow server --artifacts-destination` on loopback
(pipeline.apps.teamserver, what `make team-server` runs), two experiments run concurrently from two processes,
and a run that outlives a restart of the tracking server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, free_port

pytestmark = pytest.mark.scale

ARMS = {"naive", "engineered", "finetuned", "finetuned-int8"}
# Two experiments that must not cross: each scores its own number of test rows.
TEAM_ROWS = {"team-a": 6, "team-b": 5}


@pytest.fixture(scope="module")
def team_server():
    from pipeline.apps.teamserver import pg_bin, start_team_server

    try:
        pg_bin()
    except Exception as exc:
        if os.environ.get("ROI_REQUIRE_POSTGRES"):
            raise
        pytest.skip(f"{exc}")
    # Under /tmp and world-traversable: as root, PostgreSQL runs as the `postgres` user, which cannot enter
    # pytest's private temporary folders.
    folder = Path(tempfile.mkdtemp(prefix="roi-team-"))
    folder.chmod(0o755)
    postgres, server = start_team_server(folder, free_port(), free_port())
    yield postgres, server
    server.stop()
    postgres.stop()
    shutil.rmtree(folder, ignore_errors=True)


def _start_run(server, experiment: str, rows: int, out: Path) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_TRACKING_URI=server.uri, PYTHONUNBUFFERED="1")
    overrides = [o for o in TINY if not o.startswith("eval.limit=")] + [f"eval.limit={rows}"]
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "experiments" / "default.yaml"),
                             *overrides, f"experiment={experiment}", f"output_dir={out}"], cwd=out.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 900) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:] + err[-3000:]
    return out, err


def _runs(server, experiment: str):
    """The experiment's parent run and its arm runs, by arm name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("roi.role") == "parent"]
    assert len(parents) == 1, f"{experiment}: {len(parents)} parent runs"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) + 1 == len(runs), f"{experiment}: runs that belong to no parent"
    return client, parent, {r.data.tags["arm"]: r for r in children}


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def _figures(run) -> set[str]:
    """A parent's figures: logged as metrics, or as `NAME=never` tags; intervals left out."""
    names = set(run.data.metrics) | {k for k, v in run.data.tags.items() if v == "never" and k != "break_even"}
    return {n for n in names if not n.endswith(("_ci_low", "_ci_high"))}


def _linked_prompts(run) -> set[str]:
    return {p["name"] for p in json.loads(run.data.tags.get("mlflow.linkedPrompts", "[]"))}


@pytest.fixture(scope="module")
def concurrent_runs(team_server, tmp_path_factory):
    """Two tiny experiments started together from two processes against the same server."""
    _, server = team_server
    processes = {}
    for name, rows in TEAM_ROWS.items():
        out = tmp_path_factory.mktemp(name) / "runs"
        processes[name] = _start_run(server, name, rows, out)
    started = time.perf_counter()
    outputs = {name: _finish(p) for name, p in processes.items()}
    return outputs, time.perf_counter() - started


def test_two_experiments_at_once_on_postgres_lose_nothing_and_cross_nothing(team_server, concurrent_runs, tmp_path):
    _, server = team_server
    for experiment, rows in TEAM_ROWS.items():
        client, parent, arms = _runs(server, experiment)
        assert parent.info.status == "FINISHED" and set(arms) == ARMS
        assert parent.data.params["n_eval"] == str(rows)
        assert {"token_reduction_x", "finetune_fixed_cost_usd", "prompt_gain_pts"} <= set(parent.data.metrics)
        assert {"roi_summary.md", "cost_vs_volume.png", "config/resolved_config.yaml"} <= _artifact_paths(
            client, parent.info.run_id)
        # Every arm's prompt is registered under this experiment's name and linked to this parent only.
        assert _linked_prompts(parent) == {f"{experiment}-{arm}" for arm in ARMS}
        for arm, run in arms.items():
            assert run.info.status == "FINISHED"
            assert {"accuracy", "latency_p50_ms", "prompt_tokens_mean", "cost_per_1k_calls_usd"} <= set(
                run.data.metrics)
            assert _linked_prompts(run) == {f"{experiment}-{arm}"}
            # The artifacts went through the server's proxy and hold this experiment's rows, not the other's.
            local = Path(client.download_artifacts(run.info.run_id, "predictions.jsonl", str(tmp_path)))
            lines = local.read_text().splitlines()
            assert len(lines) == rows
            assert run.data.metrics["accuracy"] == pytest.approx(sum(json.loads(x)["correct"] for x in lines) / rows)
        assert "adapter/adapter_model.safetensors" in _artifact_paths(client, arms["finetuned"].info.run_id)
        curve = client.get_metric_history(arms["finetuned"].info.run_id, "train/loss")
        assert sorted(m.step for m in curve) == [1, 2, 3]
    # The artifacts are on the server's side (--artifacts-destination), not in the clients' folders.
    import mlflow

    exp = mlflow.tracking.MlflowClient(tracking_uri=server.uri).get_experiment_by_name("team-a")
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    assert any(server.artifacts.rglob("predictions.jsonl"))


def test_a_run_survives_a_tracking_server_restart_and_every_metric_arrives(team_server, concurrent_runs,
                                                                           tmp_path):
    """The server goes down as the run starts logging and comes back 5 s later: the run retries with
    backoff, finishes, and logs the same metrics (and values) as the same config did without a restart."""
    from mlflow.tracking import MlflowClient

    _, server = team_server
    process = _start_run(server, "team-restart", TEAM_ROWS["team-a"], tmp_path / "runs")
    client = MlflowClient(tracking_uri=server.uri)
    deadline = time.monotonic() + 600
    while True:  # the parent run appears: the run is about to log its config, params and datasets
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it started logging"
        exp = client.get_experiment_by_name("team-restart")
        if exp and client.search_runs([exp.experiment_id]):
            break
        time.sleep(0.05)
    server.stop()
    time.sleep(5)
    assert process.poll() is None, "the run failed while the tracking server was down"
    server.start()
    _, err = _finish(process)
    # The requests did hit the downtime, and were retried (said on stderr, not silent).
    assert f"roi: note: tracking server {server.uri} did not answer" in err

    _, parent, arms = _runs(server, "team-restart")
    _, reference_parent, reference_arms = _runs(server, "team-a")  # same config, no restart
    assert parent.info.status == "FINISHED" and set(arms) == ARMS
    # The same figures arrived. A break-even rests on measured throughput, so one run can log it and the other
    # tag it `never` (its interval is then not a number and not logged): compare figure names, logged either way.
    assert _figures(parent) == _figures(reference_parent)
    for deterministic in ("token_reduction_x", "prompt_gain_pts", "mcnemar_p"):
        assert parent.data.metrics[deterministic] == reference_parent.data.metrics[deterministic], deterministic
    for arm, run in arms.items():
        reference = reference_arms[arm]
        assert set(run.data.metrics) == set(reference.data.metrics), arm
        assert run.data.metrics["accuracy"] == reference.data.metrics["accuracy"], arm  # greedy: deterministic
        assert run.data.metrics["prompt_tokens_mean"] == reference.data.metrics["prompt_tokens_mean"], arm
        assert set(run.data.params) == set(reference.data.params), arm
    curve = client.get_metric_history(arms["finetuned"].info.run_id, "train/loss")
    assert sorted(m.step for m in curve) == [1, 2, 3]
