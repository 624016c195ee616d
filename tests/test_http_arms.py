"""`roi run` with arms behind an OpenAI-compatible API: a real local HTTP server that misbehaves
(tests/fake_openai.py) stands in for the paid API; the runs, stores and outputs are real."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, roi, sqlite_store
from fake_openai import FakeOpenAI, Faults
from pipeline.backends.preflight import PROBE_TEXT
from pipeline.task.splits import eval_rows, load_task, task_config_for_folder

pytestmark = pytest.mark.model  # real model runs: left out of make test-fast


TASK = ROOT / "datasets" / "support_tickets"


def _config(tmp_path: Path, base_url: str, **eval_keys) -> Path:
    """An experiment with one arm on an API model and nothing local (no model loads)."""
    path = tmp_path / "api.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": "api-arm",
        "task": {"path": str(TASK), "labels": "labels.json",
                 "splits": {"train": "train.jsonl", "test": "test.jsonl"}},
        "models": {"api": {"backend": "openai", "base_url": base_url, "model": "fake",
                           "api_key_env": "OPENAI_API_KEY", "max_concurrency": 16, "max_retries": 4,
                           "timeout_s": 1.0}},
        "arms": [{"name": "engineered-api", "model": "api", "prompt": "engineered",
                  "price": {"kind": "per_token", "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60}}],
        "eval": {"warmup": 0, **eval_keys},
        "output_dir": str(tmp_path / "runs"),
    }))
    return path


def _env(tmp_path: Path, key: str) -> dict:
    import os

    return dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"), OPENAI_API_KEY=key,
                PYTHONUNBUFFERED="1")


def _arm_run(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("api-arm")
    runs = client.search_runs([exp.experiment_id])
    return next(r for r in runs if r.data.tags.get("arm") == "engineered-api"), runs


def test_a_faulty_api_loses_no_row_reorders_none_and_the_run_completes(tmp_path):
    rows = eval_rows(load_task(task_config_for_folder(TASK)), None, 0)
    texts = list(rows["text"])
    always_fail = set(texts[10:15])
    faults = Faults(seed=1, rate_429=0.15, rate_5xx=0.10, rate_drop=0.05, rate_delay=0.1, rate_hang=0.005,
                    hang_s=1.5, always_fail=always_fail)
    with FakeOpenAI(faults) as server:
        # Two timed passes over all 456 test rows (not stopped early): 912 calls.
        result = roi("run", str(_config(tmp_path, server.base_url, repeats=2, sequential=None)),
                     env=_env(tmp_path, "k"), cwd=tmp_path, timeout=600)
        sent = len(server.requests)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sent > 2 * len(texts)  # every call, plus the retries
    arm, runs = _arm_run(tmp_path)
    assert all(r.info.status == "FINISHED" for r in runs)
    predictions = [json.loads(line) for line in
                   (next((tmp_path / "runs" / "api-arm").glob("*")) / "engineered-api" / "predictions.jsonl")
                   .read_text().splitlines()]
    assert [p["row_id"] for p in predictions] == list(range(len(texts)))
    assert [p["input"] for p in predictions] == texts  # none lost, none reordered
    failed = [p for p in predictions if "error" in p]
    assert {p["input"] for p in failed} == always_fail
    assert all("503" in p["error"] and p["retries"] == 4 and not p["correct"] for p in failed)
    ok = [p for p in predictions if "error" not in p]
    # The fake answers each input upper-cased: every other row got its own answer.
    assert all(p["raw_output"] == p["input"].upper() for p in ok)
    m = arm.data.metrics
    assert m["failed_rate"] == pytest.approx(len(always_fail) / len(texts))
    first_pass_retries = sum(p.get("retries", 0) for p in predictions)
    assert m["retries_total"] >= first_pass_retries > len(failed) * 4  # random faults were retried too
    assert arm.data.tags["backend"] == "openai" and arm.data.tags["arm_kind"] == "prompt"
    assert arm.data.tags["model"] == "fake"


def _files_containing(folder: Path, marker: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and marker in p.read_bytes()]


@pytest.mark.parametrize("server_key", ["accepts", "rejects"])
def test_the_api_key_appears_nowhere(tmp_path, server_key):
    marker = "sk-roi-secret-marker-7f3a9c"
    with FakeOpenAI(Faults(), api_key=marker if server_key == "accepts" else "the-right-key") as server:
        result = roi("run", str(_config(tmp_path, server.base_url, limit=12)), env=_env(tmp_path, marker),
                     cwd=tmp_path, timeout=300)
        sent = {r["headers"].get("authorization") for r in server.requests + server.gets}
    assert sent == {f"Bearer {marker}"}  # the key did go to the server, and only there
    assert marker not in result.stdout + result.stderr
    if server_key == "rejects":  # the preflight stops the run: one line naming the variable, the key masked
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.count("\n") == 1 and "OPENAI_API_KEY" in result.stderr and "sk-…3a9c" in result.stderr
        assert server.requests == []  # the model list refused the key: not one completion was asked for
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        arm, _ = _arm_run(tmp_path)
        assert arm.data.metrics["failed_rate"] == 0.0
        assert not any(marker in str(v) for v in {**arm.data.params, **arm.data.tags}.values())
    # The MLflow store (sqlite file and artifacts), the run folders, the stage store: nowhere.
    assert _files_containing(tmp_path, marker.encode()) == []


def test_a_rerun_reuses_the_stored_api_evaluation_and_force_calls_again(tmp_path):
    with FakeOpenAI(Faults()) as server:
        config, env = _config(tmp_path, server.base_url, limit=6), _env(tmp_path, "k")
        first = roi("run", str(config), env=env, cwd=tmp_path, timeout=300)
        paid = len(_evaluated(server))
        again = roi("run", str(config), env=env, cwd=tmp_path, timeout=300)
        after_rerun = len(_evaluated(server))
        forced = roi("run", str(config), "--force", env=env, cwd=tmp_path, timeout=300)
        after_force = len(_evaluated(server))
        probes = len(server.requests) - after_force
    assert first.returncode == again.returncode == forced.returncode == 0, again.stderr[-2000:]
    assert paid == 6 and after_rerun == paid and after_force == 2 * paid
    assert probes == 3  # each run asks for one token first, reused or not
    assert "reused stored results" in again.stdout
    # The same config pointed at another server is another stage: nothing is reused across endpoints.
    with FakeOpenAI(Faults()) as other:
        moved = roi("run", str(_config(tmp_path, other.base_url, limit=6)), env=env, cwd=tmp_path, timeout=300)
        assert moved.returncode == 0 and len(_evaluated(other)) == 6


def _evaluated(server: FakeOpenAI) -> list[dict]:
    """The requests that evaluated rows: all but the preflight's one-token probes."""
    return [r for r in server.requests if r.get("input") != PROBE_TEXT]
