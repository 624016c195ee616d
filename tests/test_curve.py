"""The learning curve (`curve:`): bad sizes and arms are one line and exit 2 before any model loads; a tiny real
curve trains each size once, logs its points as child runs and its figures on the parent, and a re-run reuses
every point's stages."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import ROOT, roi, sqlite_store
from pipeline.cli import main

BASE = {"experiment": "curve", "task": {"path": str(ROOT / "datasets" / "support_tickets"), "labels": "labels.json",
                                        "splits": {"train": "train.jsonl", "test": "test.jsonl"}},
        "arms": ["engineered", "finetuned"]}


@pytest.mark.parametrize("change, words", [
    ({"curve": {"rows": [100, 5000]}}, "curve.rows[1]: 5000 is more than the train split's 911 rows"),
    ({"curve": {"rows": [6]}}, "curve.rows[0]: 6 rows cannot hold one row of each of the task's 12 labels"),
    ({"curve": {"rows": [100], "arm": "engineered"}}, "curve.arm: 'engineered' does not train a LoRA adapter here"),
    ({"curve": {"rows": [100], "arm": "tuned"}}, "curve.arm: no arm named 'tuned'"),
    ({"curve": {"rows": [100]}, "arms": ["naive", "engineered"]}, "curve: no fine-tuned arm to train"),
    ({"curve": {"rows": []}}, "curve.rows"),
])
def test_a_bad_curve_is_one_line_before_any_model_loads(tmp_path, capsys, change, words):
    path = tmp_path / "curve.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change, "output_dir": str(tmp_path / "runs")}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("roi: error: ") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs" / "stages").exists()  # nothing trained or measured


TINY = ["data.train_limit=96", "eval.limit=24", "finetune.max_steps=3", "finetune.batch_size=8", "prompts.few_shot_k=4",
        "eval.uncached_sample=0", "eval.batch1_sample=0", "eval.max_new_tokens=8", "arms=[engineered,finetuned]",
        "curve.rows=[24,48]", "curve.target_accuracy=0.5"]


@pytest.mark.model
def test_a_tiny_curve_trains_each_size_once_and_a_rerun_reuses_them(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"), PYTHONUNBUFFERED="1")
    args = ["run", str(ROOT / "experiments" / "default.yaml"), *TINY, f"output_dir={tmp_path / 'runs'}"]
    first = roi(*args, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert first.stdout.count("fine-tuning LoRA") == 3  # 24, 48 and the whole 96-row split
    second = roi(*args, env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    # Nothing trains or evaluates again: the two arms and both points reuse their stored evaluations.
    assert "fine-tuning LoRA" not in second.stdout and second.stdout.count("reused stored results") == 4

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("support-triage").experiment_id],
                              order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("roi.role") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    points = {int(r.data.tags["train_rows"]): r for r in children if r.data.tags.get("roi.role") == "curve_point"}
    assert sorted(points) == [24, 48] and all(r.data.tags["curve_point"] == "finetuned" for r in points.values())
    assert all(r.data.tags.get("reused") == "true" for r in points.values())
    # The points trained on their own rows: a fine-tune's labelling and training figures follow its size.
    folder = max((tmp_path / "runs" / "support-triage").glob("2*"))
    curve = json.loads((folder / "report" / "learning_curve.json").read_text())
    assert [p["rows"] for p in curve["points"]] == [24, 48, 96]
    assert curve["baseline"]["name"] == "engineered"
    assert "learning_curve.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "rows_to_match_baseline" in parent.data.metrics or parent.data.tags.get("rows_to_match_baseline") == "never"
    assert "How many labelled rows" in (folder / "report" / "roi_report.md").read_text()
