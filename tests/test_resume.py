"""Faults: stored stages are reused, a SIGKILLed training resumes from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, roi, sqlite_store

pytestmark = pytest.mark.model  # real model runs: left out of make test-fast


TINY = ["eval.limit=4", "data.train_limit=64", "finetune.max_steps=8", "finetune.batch_size=8",
        "finetune.checkpoint_steps=2", "prompts.few_shot_k=2", "eval.uncached_sample=0", "eval.warmup=0",
        "eval.max_new_tokens=8", "eval.batch1_sample=0", "stats.resamples=200", "arms=[naive,engineered,finetuned]"]
CONFIG = str(ROOT / "experiments" / "default.yaml")


def _env(tmp: Path) -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp / "mlflow.db"), PYTHONUNBUFFERED="1")


def _adapter(out: Path):
    from safetensors.torch import load_file

    (path,) = out.glob("stages/finetune-*/adapter/adapter_model.safetensors")
    return load_file(str(path))


def _saved(out: Path, checkpoint: str) -> float | None:
    """The training time a checkpoint recorded, once it is complete (the Trainer writes its state last)."""
    for state in out.glob(f"stages/finetune-*/trainer/{checkpoint}/trainer_state.json"):
        try:
            return json.loads(state.read_text())["stateful_callbacks"]["TrainClock"]["attributes"]["seconds"]
        except (ValueError, KeyError):
            pass  # still being written
    return None


def _runs(env):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("support-triage")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One whole TINY run, shared: the rerun test goes on from its store, the SIGKILL test compares its own
    resumed adapter with this one's (kept as it was trained, before any rerun could retrain it)."""
    tmp = tmp_path_factory.mktemp("first")
    env, out = _env(tmp), tmp / "out"
    first = roi("run", CONFIG, *TINY, f"output_dir={out}", env=env, cwd=tmp)
    assert first.returncode == 0, first.stderr[-2000:]
    return env, tmp, _adapter(out)


def test_rerun_reuses_stages_and_force_recomputes(first_run):
    env, tmp_path, _ = first_run
    out = tmp_path / "out"
    started = time.perf_counter()
    second = roi("run", CONFIG, *TINY, f"output_dir={out}", env=env, cwd=tmp_path)
    reused_s = time.perf_counter() - started
    assert second.returncode == 0, second.stderr[-2000:]
    assert "reused stored results" in second.stdout and "model loaded" not in second.stdout
    arms = [r for r in _runs(env) if "arm" in r.data.tags]
    assert len(arms) == 6
    first_arms, second_arms = arms[:3], arms[3:]
    assert all(r.data.tags.get("reused") == "true" for r in second_arms)
    assert not any(r.data.tags.get("reused") for r in first_arms)
    for a, b in zip(first_arms, second_arms):
        assert a.data.metrics["accuracy"] == b.data.metrics["accuracy"]
    # a price change re-prices stored measurements without recomputing them
    repriced = roi("run", CONFIG, *TINY, f"output_dir={out}", "pricing.arms.finetuned={kind: per_hour, usd_per_hour: 1.0}",
                   env=env, cwd=tmp_path)
    assert repriced.returncode == 0 and "model loaded" not in repriced.stdout
    ft = [r for r in _runs(env) if r.data.tags.get("arm") == "finetuned"]
    # One always-on box either way: the cost per call scales with its price, $1/h against the cpu-2core $0.08925/h.
    assert ft[-1].data.metrics["cost_per_call_usd"] == pytest.approx(ft[-2].data.metrics["cost_per_call_usd"] / 0.08925)
    # Another machine (here: another thread count) re-measures the local arms' timings; the adapter stands.
    import torch

    threads = "1" if torch.get_num_threads() > 1 else "2"
    other = roi("run", CONFIG, *TINY, f"output_dir={out}", env={**env, "OMP_NUM_THREADS": threads}, cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-2000:]
    assert "reusing the trained adapter" in other.stdout and "fine-tuning" not in other.stdout
    assert "reused stored results" not in other.stdout
    # --force recomputes each stage once: the int8 arm serves the adapter the finetuned arm has just retrained.
    forced = roi("run", CONFIG, *TINY, f"output_dir={out}", "arms=[naive,finetuned,finetuned-int8]", "--force",
                 env=env, cwd=tmp_path)
    assert forced.returncode == 0 and "model loaded" in forced.stdout, forced.stderr[-2000:]
    assert forced.stdout.count("fine-tuning") == 1 and "reusing the trained adapter" in forced.stdout
    assert reused_s < 60


def test_sigkill_during_training_resumes_to_the_same_adapter(first_run, tmp_path):
    env, whole = _env(tmp_path), first_run[2]
    killed_out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", CONFIG, *TINY, f"output_dir={killed_out}"],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (before_kill := _saved(killed_out, "checkpoint-4")) is None:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(killed_out.glob("stages/finetune-*/done.json")), "a killed stage must not look finished"

    resumed = roi("run", CONFIG, *TINY, f"output_dir={killed_out}", env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming training from" in resumed.stdout and "checkpoint-" in resumed.stdout
    ft = [r for r in _runs(env) if r.data.tags.get("arm") == "finetuned"][-1]
    assert ft.data.tags["resumed_from_checkpoint"].startswith("checkpoint-")
    assert ft.data.metrics["train_time_s"] > before_kill > 0  # the time before the kill is counted

    a, b = whole, _adapter(killed_out)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    scale = max(float(a[k].float().abs().max()) for k in a)
    # Same seed, data order, optimizer and RNG state restored: equal up to bf16 rounding.
    assert worst <= 0.02 * scale, (worst, scale)


def test_ctrl_c_ends_runs_killed_and_keeps_the_predictions_so_far(tmp_path):
    env, out = _env(tmp_path), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", CONFIG, "arms=[naive]", "eval.limit=200",
                             "eval.batch_size=1", "eval.warmup=0", "eval.uncached_sample=0", f"output_dir={out}"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(p.stat().st_size for p in out.glob("support-triage/*/naive/predictions.jsonl")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    runs = _runs(env)
    assert {r.info.status for r in runs} == {"KILLED"} and len(runs) == 2
    from mlflow.tracking import MlflowClient

    naive = next(r for r in runs if r.data.tags.get("arm") == "naive")
    local = MlflowClient(env["MLFLOW_TRACKING_URI"]).download_artifacts(naive.info.run_id, "predictions.jsonl",
                                                                       str(tmp_path))
    kept = Path(local).read_text().splitlines()
    assert 1 <= len(kept) < 200
    assert not list(out.glob("stages/eval-*/done.json"))  # an interrupted evaluation is not stored as finished
