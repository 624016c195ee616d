"""Data-parallel training for real: `roi run --processes 2` (two CPU processes, gloo, via accelerate) against the
same run on one process with the same global batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, roi, sqlite_store

# Enough training for the adapter to learn (2 epochs of 256 rows at a global batch of 8: 64 steps) and enough
# test rows to compare accuracies; the prompt arms are measured once and reused by the second run (same output_dir).
CONFIG = ["eval.limit=60", "data.train_limit=256", "finetune.epochs=2", "finetune.batch_size=8",
          "finetune.checkpoint_steps=0", "finetune.logging_steps=8", "prompts.few_shot_k=4",
          "eval.uncached_sample=2", "eval.warmup=1", "eval.max_new_tokens=8", "eval.batch_size=8"]
# Two processes see the same global batches in a different order within each batch, and their gradient is
# reduced in another order: the adapters differ in rounding, not in what they learned.
ACCURACY_TOLERANCE_PTS = 5.0


def _arms(env, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("roi.role") == "parent"]
    return client, parents, runs


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp / "mlflow.db"), PYTHONUNBUFFERED="1")
    results = {}
    for processes, experiment in ((1, "ddp-one"), (2, "ddp-two")):
        result = roi("run", str(ROOT / "experiments" / "default.yaml"), *CONFIG, f"experiment={experiment}",
                     f"output_dir={tmp / 'runs'}", *(["--processes", "2"] if processes == 2 else []),
                     env=env, cwd=tmp, timeout=1500)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        results[processes] = result
    return env, tmp, results


@pytest.mark.scale
def test_two_processes_train_the_adapter_and_match_one_process(one_and_two_processes):
    env, tmp, results = one_and_two_processes
    figures = {}
    for processes, experiment in ((1, "ddp-one"), (2, "ddp-two")):
        client, parents, runs = _arms(env, experiment)
        assert len(parents) == 1  # only the recipe's process logs: no rank started a run of its own
        arms = {r.data.tags["arm"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
        assert set(arms) == {"naive", "engineered", "finetuned", "finetuned-int8"}
        tuned = arms["finetuned"]
        args = json.loads(Path(client.download_artifacts(tuned.info.run_id, "trainer/training_args.json",
                                                         str(tmp / experiment))).read_text())
        assert args["per_device_train_batch_size"] == 8 // processes
        adapter = Path(client.download_artifacts(tuned.info.run_id, "adapter", str(tmp / experiment)))
        weights = load_file(adapter / "adapter_model.safetensors")
        # LoRA's B matrices start at zero: nonzero B means the optimizer updated the adapter.
        assert all(w.abs().max() > 0 for name, w in weights.items() if "lora_B" in name)
        loss = [m.value for m in sorted(client.get_metric_history(tuned.info.run_id, "train/loss"),
                                        key=lambda m: m.step)]
        assert len(loss) == 8 and loss[-1] < loss[0]
        figures[processes] = tuned.data.metrics
    assert figures[2]["accuracy"] > 0.3  # it learned the task, not the majority label
    assert abs(figures[2]["accuracy"] - figures[1]["accuracy"]) * 100 <= ACCURACY_TOLERANCE_PTS
    # Both trained on every row exactly once: the processes' token counts add up to one process's (to a token or
    # two: the end-of-turn token doubles as padding, and "non-padding" tokens are counted per padded batch).
    assert figures[2]["train_tokens"] == pytest.approx(figures[1]["train_tokens"], abs=4)
    assert "training on 2 processes" in results[2].stdout
    stage = next((tmp / "runs" / "stages").glob("*/processes.log"))
    assert "Traceback" not in stage.read_text()


def test_roi_run_under_a_launcher_says_how_to_start_it(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}")
    result = roi("run", str(ROOT / "experiments" / "default.yaml"), env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == ("roi: error: roi run was started by a distributed launcher (WORLD_SIZE=2): run "
                                     "`roi run CONFIG --processes 2` instead, without the launcher")


def test_a_batch_that_does_not_split_over_the_processes_is_one_line(tmp_path):
    result = roi("run", str(ROOT / "experiments" / "default.yaml"), "finetune.batch_size=6", "--processes", "4",
                 env=dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "finetune.batch_size 6 (the global batch) does not split evenly over 4 processes" in result.stderr
