"""A tiny real run of each new task type, end to end: the shipped configs on the real model with real training
steps and a real MLflow store; their primary metric reaches the arms, the paired test, the verdict, the report
and the saved MLflow view. Config mistakes about task types are one line before any model loads."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import ROOT, roi, sqlite_store
from pipeline.cli import main

TINY = ["eval.limit=12", "data.train_limit=32", "finetune.max_steps=2", "finetune.batch_size=8", "prompts.few_shot_k=2",
        "eval.uncached_sample=0", "eval.batch1_sample=0", "eval.warmup=1"]


def _run(tmp_path, config: str, *extra: str):
    env = dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"), PYTHONUNBUFFERED="1")
    result = roi("run", str(ROOT / "experiments" / config), *TINY, *extra, f"output_dir={tmp_path / 'runs'}",
                 env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.search_experiments()[0]
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("roi.role") == "parent")
    arms = {r.data.tags["arm"]: r for r in runs if r.data.tags.get("roi.role") == "arm"}
    return result, client, experiment, parent, arms


@pytest.mark.model
def test_a_tiny_extraction_run_scores_field_f1_end_to_end(tmp_path):
    result, client, experiment, parent, arms = _run(tmp_path, "extraction.yaml", "eval.max_new_tokens=64")
    assert set(arms) == {"naive", "engineered", "engineered-json", "finetuned"}
    for name, run in arms.items():
        m = run.data.metrics
        assert {"field_f1", "field_precision", "field_recall", "exact_match", "json_valid_rate",
                "field_f1_ci_low", "field_f1_ci_high", "cost_per_1k_calls_usd"} <= set(m), name
        assert "accuracy" not in m and m["field_f1_ci_low"] <= m["field_f1"] <= m["field_f1_ci_high"]
        assert m["rows_evaluated"] == 12  # field-F1 is micro over pairs: no sequential stop, every row
        table = json.loads(open(client.download_artifacts(run.info.run_id, "per_field.json")).read())
        field_column = table["columns"].index("field")
        assert [row[field_column] for row in table["data"]][:5] == ["product", "order_id", "urgency",
                                                                    "requested_action", "error_codes"]
    # Constrained decoding: every answer is an object of the schema
    assert arms["engineered-json"].data.metrics["json_valid_rate"] == 1.0
    p = parent.data.metrics
    assert "permutation_p" in p and "mcnemar_p" not in p
    assert "field_f1" in parent.data.tags["verdict_reason"]  # the verdict is read on the primary metric
    view = json.loads(json.loads(experiment.tags["mlflow.sharedViewState.roi-arms"])["state"])
    assert view["selectedColumns"][0] == "metrics.`field_f1`"
    report = next((tmp_path / "runs").rglob("roi_report.html")).read_text()
    assert "Field-F1 [CI]" in report and "paired permutation p" in report
    assert "field_f1 is micro-averaged" in parent.data.tags["notes"]  # the default sequential rule cannot apply
    # Read back from MLflow as another tool would: the report and the compare name the primary metric
    env = dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"))
    report = roi("report", "--experiment", "support-fields", "--markdown", env=env, cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| field-F1 [95% CI] |" in report.stdout and "accuracy by parser" not in report.stdout
    compared = roi("compare", "--experiment", "support-fields", "--out", str(tmp_path / "compare"), env=env, cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr[-2000:]
    row = (tmp_path / "compare" / "roi_compare.csv").read_text().splitlines()[1]
    assert "field-F1" in row and "(permutation)" in row


@pytest.mark.model
def test_a_tiny_generation_run_scores_chrf_end_to_end(tmp_path):
    result, client, experiment, parent, arms = _run(tmp_path, "summary.yaml", "eval.sequential=null")
    assert set(arms) == {"naive", "engineered", "finetuned"}
    for name, run in arms.items():
        m = run.data.metrics
        assert {"chrf", "rouge_l", "exact_match", "chrf_ci_low", "chrf_ci_high"} <= set(m), name
        assert 0.0 <= m["chrf"] <= 1.0 and "accuracy" not in m
    rows = [json.loads(line) for line in
            open(client.download_artifacts(arms["finetuned"].info.run_id, "predictions.jsonl"))]
    assert len(rows) == 12 and all("score" in r and "parsed" in r for r in rows)
    assert "permutation_p" in parent.data.metrics
    summary = next((tmp_path / "runs").rglob("roi_summary.md")).read_text()
    assert "chrF [95% CI]" in summary and "ROUGE-L" in summary


@pytest.mark.parametrize("change, words", [
    ({"task": {"type": "extraction", "path": str(ROOT / "datasets" / "support_fields"), "target_column": "fields",
               "schema": "schema.json"}, "curve": {"rows": [100]}}, "curve: learning curves stratify"),
    ({"task": {"type": "generation", "path": str(ROOT / "datasets" / "support_summaries"),
               "target_column": "summary"}, "eval": {"decoding": "constrained"}},
     "eval.decoding: constrained needs a label set or a schema"),
    ({"task": {"type": "summarisation", "path": str(ROOT / "datasets" / "support_summaries")}}, "task.type"),
    ({"task": {"type": "extraction", "path": str(ROOT / "datasets" / "support_fields"), "target_column": "fields",
               "schema": "missing.json"}}, "missing.json: schema file not found (task.schema)"),
])
def test_task_type_mistakes_are_one_line_before_any_model_loads(tmp_path, capsys, change, words):
    config = {"experiment": "types", "arms": ["engineered", "finetuned"], **change,
              "output_dir": str(tmp_path / "runs")}
    config["task"].setdefault("splits", {"train": "train.jsonl", "test": "test.jsonl"})
    path = tmp_path / "types.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("roi: error: ") and words in err and err.count("\n") == 1, err


FIELDS = ROOT / "datasets" / "support_fields"


@pytest.mark.parametrize("schema, extra, words", [
    # valid JSON Schema (jsonschema checks the targets with it), but the decoder's regex engine has no look-ahead
    ({"pattern": "^(?=.)[A-Za-z0-9-]+$"}, {}, "llguidance cannot compile it: regex parse error"),
    ({}, {"eval": {"decoding": "constrained", "max_new_tokens": 8}}, "max_new_tokens=8 is below the"),
    ({"$ref": "#/$defs/nowhere"}, {}, "the schema cannot check"),
])
def test_a_schema_constrained_decoding_cannot_use_is_one_line_before_any_model_loads(tmp_path, capsys, schema,
                                                                                     extra, words):
    full = json.loads((FIELDS / "schema.json").read_text())
    full["properties"]["order_id"] = {**full["properties"]["order_id"], **schema}
    (tmp_path / "schema.json").write_text(json.dumps(full))
    config = {"experiment": "types", "output_dir": str(tmp_path / "runs"),
              "arms": [{"name": "json", "prompt": "engineered", "eval": {"decoding": "constrained"}}],
              "task": {"type": "extraction", "path": str(FIELDS), "target_column": "fields",
                       "schema": str(tmp_path / "schema.json"),
                       "splits": {"train": "train.jsonl", "test": "test.jsonl"}}, **extra}
    if "eval" in extra:
        config["arms"] = [{"name": "json", "prompt": "engineered"}]
    path = tmp_path / "types.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("roi: error: ") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs" / "stages").exists()
