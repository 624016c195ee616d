"""`roi run` against API servers that cannot answer: one line and exit 2 before any data loads or any model
trains, from a real local OpenAI-compatible server (tests/fake_openai.py) or a port where nothing listens."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, roi
from fake_openai import FakeOpenAI, Faults

pytestmark = pytest.mark.model  # `roi run` in a subprocess: left out of make test-fast

TASK = ROOT / "datasets" / "support_tickets"
KEY = "sk-roi-preflight-key-0a1b2c3d"


def _config(tmp_path: Path, base_url: str, model: str = "fake", train: bool = True, **api) -> Path:
    """An API arm, and (with `train`) a local fine-tune that would start training if the preflight let it."""
    arms = [{"name": "engineered-api", "model": "api", "prompt": "engineered",
             "price": {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60}}]
    if train:
        arms.append("finetuned")
    path = tmp_path / "api.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": "preflight",
        "task": {"path": str(TASK), "labels": "labels.json", "splits": {"train": "train.jsonl", "test": "test.jsonl"}},
        "models": {"api": {"backend": "openai", "base_url": base_url, "model": model, "api_key_env": "ROI_TEST_KEY",
                           "max_retries": 0, "timeout_s": 1.0, **api}},
        "arms": arms,
        "eval": {"warmup": 0, "limit": 4}, "data": {"train_limit": 48}, "finetune": {"max_steps": 1},
        "output_dir": str(tmp_path / "runs"),
    }))
    return path


def _run(tmp_path: Path, config: Path, key: str = KEY):
    # No store made beforehand: only a run that gets past the preflight makes one.
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", ROI_TEST_KEY=key,
               PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    result = roi("run", str(config), env=env, cwd=tmp_path, timeout=120)
    return result, time.perf_counter() - started


def _stopped_at_the_door(tmp_path: Path, result, seconds: float) -> str:
    """Exit 2, one line, no traceback, quickly, and nothing ran: no store, no run folder, no stage, no training."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("roi: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert seconds < 30
    assert "fine-tuning" not in result.stdout and not (tmp_path / "runs").exists()
    assert not (tmp_path / "mlflow.db").exists()
    return result.stderr.strip().removeprefix("roi: error: ")


def test_nothing_listening_names_the_model_key_and_its_base_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    line = _stopped_at_the_door(tmp_path, *_run(tmp_path, _config(tmp_path, url)))
    assert line == f"models.api: cannot reach {url} (connection refused); is the server running and base_url right?"


def test_a_server_that_never_answers_is_a_timeout(tmp_path):
    with FakeOpenAI(Faults(rate_hang=1.0, hang_s=3.0)) as server:
        line = _stopped_at_the_door(tmp_path, *_run(tmp_path, _config(tmp_path, server.base_url)))
    assert line == f"models.api: cannot reach {server.base_url} (no answer within 1 s); is the server running and " \
                   "base_url right?"


def test_a_refused_key_names_the_variable_and_masks_the_key(tmp_path):
    with FakeOpenAI(api_key="the-right-key") as server:
        line = _stopped_at_the_door(tmp_path, *_run(tmp_path, _config(tmp_path, server.base_url)))
    assert line == (f"models.api: {server.base_url} refused the key in ROI_TEST_KEY (sk-…2c3d) with 401 "
                    "(Incorrect API key provided: sk-…2c3d)")
    assert KEY not in line


def test_an_unknown_model_lists_what_the_server_offers_and_the_closest(tmp_path):
    with FakeOpenAI(model="gpt-4o-mini", also_serves=("gpt-4o", "llama-3.1-8b-instruct")) as server:
        line = _stopped_at_the_door(tmp_path, *_run(tmp_path, _config(tmp_path, server.base_url, "gpt-4o-mni")))
    assert line == (f"models.api.model: {server.base_url} does not offer 'gpt-4o-mni' (it offers: gpt-4o-mini, "
                    "gpt-4o, llama-3.1-8b-instruct); did you mean 'gpt-4o-mini' or 'gpt-4o'?")


def test_an_unknown_model_on_a_server_without_a_model_list_is_its_404(tmp_path):
    with FakeOpenAI(models_route=False) as server:
        line = _stopped_at_the_door(tmp_path, *_run(tmp_path, _config(tmp_path, server.base_url, "nope")))
        assert [g["path"] for g in server.gets] == ["/v1/models"] and len(server.requests) == 1
    assert line.startswith(f"models.api.model: {server.base_url} answered 404 (The model `nope` does not exist")
    assert line.endswith("for model 'nope'; check the model id, and that base_url is the API root (often ending "
                         "in /v1)")


def test_a_base_url_without_a_scheme_is_a_config_error_with_the_corrected_form(tmp_path):
    port = free_port()
    line = _stopped_at_the_door(tmp_path, *_run(tmp_path, _config(tmp_path, f"127.0.0.1:{port}/v1")))
    assert line == (f"{tmp_path / 'api.yaml'}: models.api.base_url: a base_url needs a scheme: did you mean "
                    f"http://127.0.0.1:{port}/v1? (got '127.0.0.1:{port}/v1')")


def test_a_server_without_a_model_list_is_no_error(tmp_path):
    with FakeOpenAI(models_route=False) as server:
        result, _ = _run(tmp_path, _config(tmp_path, server.base_url, train=False))
        assert [g["path"] for g in server.gets] == ["/v1/models"]  # asked, answered 404, went on
        evaluated = [r for r in server.requests if r["body"]["max_tokens"] != 1]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(evaluated) == 4 and "engineered-api" in result.stdout
