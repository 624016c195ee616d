"""Sequential evaluation end to end: `roi run` against real local OpenAI-compatible servers
(tests/fake_openai.py) whose answers are scripted per test row. Each arm stops at the first check where
its accuracy is known to `half_width` or the compare pair's difference is decided; both arms score the
same rows in the same order; a fixed-size run (`eval.sequential: null`) scores every row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, roi, sqlite_store
from fake_openai import FakeOpenAI

pytestmark = pytest.mark.model  # `roi run` in a subprocess: left out of make test-fast

TASK = ROOT / "datasets" / "support_tickets"
PRICE = {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60}
GOLD = {json.loads(line)["text"].strip(): json.loads(line)["label"]
        for line in (TASK / "test.jsonl").read_text().splitlines()}


def _gold_of(prompt: str) -> str:
    return next(label for text, label in GOLD.items() if text in prompt)


def right(prompt: str) -> str:
    return _gold_of(prompt)


def wrong(prompt: str) -> str:
    return "billing" if _gold_of(prompt) != "billing" else "bug_report"


def _config(tmp_path: Path, baseline_url: str, candidate_url: str, sequential) -> Path:
    path = tmp_path / "seq.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": "sequential",
        "task": {"path": str(TASK), "labels": "labels.json", "splits": {"train": "train.jsonl", "test": "test.jsonl"}},
        "models": {"base": {"backend": "openai", "base_url": baseline_url, "model": "fake", "max_concurrency": 1},
                   "tuned": {"backend": "openai", "base_url": candidate_url, "model": "fake", "max_concurrency": 1}},
        "arms": [{"name": "prompted", "model": "base", "prompt": "engineered", "price": PRICE},
                 {"name": "tuned", "model": "tuned", "prompt": "finetuned", "kind": "finetuned", "price": PRICE}],
        "compare": {"baseline": "prompted", "candidate": "tuned"},
        "eval": {"warmup": 0, "limit": 200, "sequential": sequential, "batch1_sample": 0, "uncached_sample": 0},
        "output_dir": str(tmp_path / "runs")}))
    return path


def _run(tmp_path: Path, config: Path) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"), PYTHONUNBUFFERED="1")
    result = roi("run", str(config), env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sequential").experiment_id],
                              order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("roi.role") == "parent")
    return {r.data.tags["arm"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


def _predictions(tmp_path: Path, arm: str) -> list[dict]:
    folder = max((tmp_path / "runs" / "sequential").glob("2*"))
    return [json.loads(line) for line in (folder / arm / "predictions.jsonl").read_text().splitlines()]


def test_each_arm_stops_when_its_answer_is_known_on_the_same_rows_in_the_same_order(tmp_path):
    rule = {"min_rows": 32, "step_rows": 16, "half_width": 0.1}
    with FakeOpenAI(answers=wrong) as baseline, FakeOpenAI(answers=right) as candidate:
        arms = _run(tmp_path, _config(tmp_path, baseline.base_url, candidate.base_url, rule))
        asked = {"prompted": len(baseline.requests), "tuned": len(candidate.requests)}
    # Always wrong: at 32 rows the confidence sequence of a constant stream is still wider than +-0.10;
    # at 48 it is narrower, so the baseline stops there on its own interval.
    assert arms["prompted"].data.tags["stopped_by"] == "interval"
    assert arms["prompted"].data.metrics["rows_evaluated"] == 48
    m = arms["prompted"].data.metrics
    assert m["accuracy_ci_high"] - m["accuracy_ci_low"] <= 2 * 0.1  # the interval reported is the one that stopped it
    # Right where the baseline is wrong on all 48 shared rows: decided at the first check.
    assert arms["tuned"].data.tags["stopped_by"] == "decided"
    assert arms["tuned"].data.metrics["rows_evaluated"] == 32
    # Calls stop with the arm: the servers saw the rows scored, the preflight probe and at most the one call
    # (max_concurrency 1) already sent when the rule stopped it.
    assert 48 + 1 <= asked["prompted"] <= 48 + 2 and 32 + 1 <= asked["tuned"] <= 32 + 2
    prompted, tuned = _predictions(tmp_path, "prompted"), _predictions(tmp_path, "tuned")
    assert [r["input"] for r in tuned] == [r["input"] for r in prompted[:32]]
    # The seeded order, not the file's: the first rows scored are not the test file's first rows.
    assert [r["input"] for r in prompted[:32]] != list(GOLD)[:32]


def test_a_fixed_size_run_scores_every_row(tmp_path):
    with FakeOpenAI(answers=wrong) as baseline, FakeOpenAI(answers=right) as candidate:
        arms = _run(tmp_path, _config(tmp_path, baseline.base_url, candidate.base_url, None))
    for arm in ("prompted", "tuned"):
        assert arms[arm].data.metrics["rows_evaluated"] == 200
        assert arms[arm].data.tags["stopped_by"] == "all_rows"
    assert arms["tuned"].data.metrics["accuracy"] == 1.0 and arms["prompted"].data.metrics["accuracy"] == 0.0
