"""An experiment whose arms go over HTTP to `roi serve`, beside the same arms run in-process: the
served base model and the served adapter (from the first run's MLflow artifact, and as `roi export`
wrote it for vLLM) give the same greedy answers and token counts. Real servers, real model, real
training steps, real MLflow store."""

import json
import os
from pathlib import Path

import yaml

from conftest import ROOT, Served, roi, sqlite_store

import pytest

pytestmark = pytest.mark.model  # real model runs: left out of make test-fast


TINY = {"eval": {"limit": 8, "batch_size": 4, "warmup": 1, "uncached_sample": 0, "batch1_sample": 0,
                 "max_new_tokens": 6},
        "data": {"train_limit": 32}, "prompts": {"few_shot_k": 4},
        "finetune": {"max_steps": 3, "batch_size": 8, "checkpoint_steps": 0}}


def _config(tmp_path: Path, name: str, models: dict, arms: list, **extra) -> Path:
    data = {"experiment": "served", "task": {"path": str(ROOT / "datasets" / "support_tickets"),
                                             "labels": "labels.json",
                                             "splits": {"train": "train.jsonl", "test": "test.jsonl"}},
            "model": {"source": "embedded", "dtype": "float32"},  # fp32: batching and caching change no answer
            "models": models, "arms": arms, "output_dir": str(tmp_path / "runs"), **TINY, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _predictions(tmp_path: Path, arm: str, nth_run: int) -> list[dict]:
    run_dir = sorted((tmp_path / "runs" / "served").iterdir())[nth_run]
    return [json.loads(line) for line in (run_dir / arm / "predictions.jsonl").read_text().splitlines()]


def _same_calls(a: list[dict], b: list[dict]) -> None:
    assert [p["input"] for p in a] == [p["input"] for p in b]
    assert [p["raw_output"] for p in a] == [p["raw_output"] for p in b]
    assert [p["prompt_tokens"] for p in a] == [p["prompt_tokens"] for p in b]
    assert [p["completion_tokens"] for p in a] == [p["completion_tokens"] for p in b]


def test_arms_over_http_to_roi_serve_match_the_same_arms_in_process(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"), PYTHONUNBUFFERED="1")
    per_hour = {"kind": "per_hour", "usd_per_hour": 0.10}
    with Served("--model", "embedded", "--dtype", "float32", "--name", "small", env=env, log_dir=tmp_path) as base:
        first = _config(tmp_path, "first", {"served": {"backend": "openai", "base_url": base.base_url,
                                                         "model": "small"}},
                        ["engineered", {"name": "engineered-http", "model": "served", "prompt": "engineered",
                                        "price": per_hour}, "finetuned"])
        result = roi("run", str(first), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    in_process, over_http = _predictions(tmp_path, "engineered", 0), _predictions(tmp_path, "engineered-http", 0)
    _same_calls(in_process, over_http)
    assert any(p["raw_output"] for p in over_http)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    tags = {r.data.tags["arm"]: r.data.tags for r in runs if "arm" in r.data.tags}
    assert tags["engineered-http"]["backend"] == "openai" and tags["engineered"]["backend"] == "local"
    trained = next(r for r in runs if r.data.tags.get("arm") == "finetuned")

    # The tuned adapter, served straight from the first run's MLflow artifact, as a fine-tuned arm over HTTP;
    # beside it the same adapter as `roi export` wrote it for vLLM (by the parent run id: its one adapter).
    adapter = f"runs:/{trained.info.run_id}/adapter"
    parent = next(r for r in runs if r.data.tags.get("roi.role") == "parent")
    exported = roi("export", parent.info.run_id, "--to", str(tmp_path / "export"), env=env, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    with Served("--model", "embedded", "--dtype", "float32", "--adapter", adapter, "--name", "tuned",
                env=env, log_dir=tmp_path) as tuned, \
            Served("--model", "embedded", "--dtype", "float32", "--adapter", str(tmp_path / "export" / "finetuned"),
                   "--name", "exported", env=env, log_dir=tmp_path) as from_export:
        second = _config(tmp_path, "second", {"tuned": {"backend": "openai", "base_url": tuned.base_url,
                                                          "model": "tuned"},
                                              "exported": {"backend": "openai", "base_url": from_export.base_url,
                                                           "model": "exported"}},
                         [{"name": "finetuned-http", "model": "tuned", "prompt": "finetuned", "kind": "finetuned",
                           "price": per_hour},
                          {"name": "finetuned-exported", "model": "exported", "prompt": "finetuned",
                           "kind": "finetuned", "price": per_hour}])
        result = roi("run", str(second), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    _same_calls(_predictions(tmp_path, "finetuned", 0), _predictions(tmp_path, "finetuned-http", 1))
    _same_calls(_predictions(tmp_path, "finetuned", 0), _predictions(tmp_path, "finetuned-exported", 1))
    runs = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    http_arm = next(r for r in runs if r.data.tags.get("arm") == "finetuned-http")
    assert http_arm.data.tags["arm_kind"] == "finetuned" and http_arm.data.tags["model"] == "tuned"
