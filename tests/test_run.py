"""The recipe's bookkeeping, without a model: run folders and the resolved config."""

import yaml

from conftest import ROOT
from pipeline.experiment.load import load_experiment
from pipeline.recipe.run import prepare


def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    import pipeline.recipe.run

    # Both runs start in the same second, however long preparing one takes here.
    monkeypatch.setattr(pipeline.recipe.run.time, "strftime", lambda fmt: "20261127-120000")
    plan = load_experiment(ROOT / "experiments" / "default.yaml", [f"output_dir={tmp_path}", "eval.limit=4"])
    first, second = prepare(plan, console=None, force=False), prepare(plan, console=None, force=False)
    assert first.run_dir != second.run_dir
    assert first.run_dir.name.startswith("20261127-120000") and second.run_dir.name.startswith("20261127-120000")
    assert first.run_dir.is_dir() and second.run_dir.is_dir()


def test_the_resolved_config_has_every_default_filled_in(tmp_path):
    path = tmp_path / "minimal.yaml"
    path.write_text(yaml.safe_dump({"experiment": "m", "task": {"path": str(ROOT / "datasets" / "support_tickets"),
                                                                "labels": "labels.json"}, "arms": ["naive", "finetuned"]}))
    plan = load_experiment(path)
    resolved = plan.resolved()
    assert resolved["eval"]["parser"] == "search" and resolved["finetune"]["lora"]["r"] == 16
    assert resolved["pricing"]["default_usd_per_hour"] == 0.10
    arms = {a["name"]: a for a in resolved["arms"]}
    assert arms["finetuned"]["kind"] == "finetuned" and arms["naive"]["finetune"] is None
    price = arms["naive"]["price"]
    assert price["kind"] == "per_hour" and price["usd_per_hour"] == 0.10
    assert price["min_replicas"] == 1 and price["target_utilisation"] == 0.6
    assert resolved["compare"] == {"baseline": "naive", "candidate": "finetuned", "naive": "naive"}
    params = plan.params()
    # Keys the file never wrote are params too, so runs compare on any key in the MLflow UI.
    assert params["finetune.seed"] == 0 and params["eval.warmup"] == 2 and params["arms"] == "naive,finetuned"
    assert params["arm.finetuned.kind"] == "finetuned" and params["arm.naive.model"] == "model"
    assert not any(k.startswith("arm.naive.eval.") for k in params)  # an arm logs only the keys it overrides


def test_run_names_say_config_time_and_the_overrides_that_change_results():
    import time
    from pathlib import Path

    from pipeline.recipe.run import run_name

    when = time.strptime("2026-11-27 09:06", "%Y-%m-%d %H:%M")
    assert run_name(Path("experiments/default.yaml"), [], when) == "default 11-27 09:06"
    assert run_name(Path("x/banking77.yaml"), ["eval.limit=50", "output_dir=/tmp/a", "finetune.epochs=1"], when) \
        == "banking77 11-27 09:06 eval.limit=50 finetune.epochs=1"
    long = run_name(Path("default.yaml"), [f"eval.k{i}={i}" for i in range(40)], when)
    assert long.startswith("default 11-27 09:06 eval.k0=0") and long.endswith("…") and len(long) <= 250


def test_ui_links_open_the_runs_view_with_the_arms_columns(monkeypatch):
    import json

    from pipeline.tracking import mlflow_store as tracking

    query = "runs?workflowType=machine_learning&viewStateShareKey=roi-arms"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.ui_link("3") == f"http://127.0.0.1:5000/#/experiments/3/{query}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:s3cret@mlflow.example.com:8443/")
    assert tracking.ui_link("3") == f"https://bob:***@mlflow.example.com:8443/#/experiments/3/{query}"
    state = json.loads(json.dumps(tracking.arms_view_state()))  # what the tag stores
    assert state["selectedColumns"] == state["columnOrder"] == [
        "metrics.`accuracy`", "metrics.`latency_p50_ms`", "metrics.`prompt_tokens_mean`",
        "metrics.`cost_per_1k_calls_usd`", "metrics.`break_even_calls`", "tags.`break_even`"]


def test_a_doubtful_price_is_a_note_of_the_run(tmp_path):
    """A catalog price past its deprecation date reaches the run's notes (printed under the table, in the report
    and as the parent's `notes` tag), naming it."""
    path = tmp_path / "dated.yaml"
    path.write_text(yaml.safe_dump({"experiment": "m", "task": {"path": str(ROOT / "datasets" / "support_tickets"),
                                                                "labels": "labels.json"}, "arms": ["naive"],
                                    "report": {"price_what_if": ["gpt-4.1-nano"]}, "output_dir": str(tmp_path)}))
    exp = prepare(load_experiment(path), console=None, force=False)
    assert "price gpt-4.1-nano: the model was deprecated on 2026-10-23" in exp.notes
