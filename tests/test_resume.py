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


# The default task at its real size (911 rows, 57 steps an epoch at batch 16, 114 in all), fp32, a checkpoint every
# 20 steps, trained in its own process so that a SIGKILL ends it as it would a user's run.
TRAINER = """
import json, sys, time
from pathlib import Path
import torch
from pipeline.experiment.config import FinetuneConfig, ModelConfig
from pipeline.models.loading import load_model, load_tokenizer, resolve_source
from pipeline.training.lora import finetune

out, log, hang_at = Path(sys.argv[1]), open(sys.argv[2], "a"), int(sys.argv[3])
if hang_at:  # stall the save of checkpoint-<hang_at> after its weights and optimizer, before its state file
    from transformers import Trainer
    save = Trainer._save_rng_state
    def stalled(self, output_dir):
        save(self, output_dir)
        if Path(output_dir).name == f"checkpoint-{hang_at}":
            (out / "saving").write_text(output_dir)
            time.sleep(3600)
    Trainer._save_rng_state = stalled
rows = [json.loads(line) for line in Path("datasets/support_tickets/train.jsonl").read_text().splitlines()]
source = resolve_source(ModelConfig())
def on_log(values, step):
    log.write(json.dumps({"step": step, "loss": values["loss"], "lr": values["learning_rate"]}) + "\\n")
    log.flush()
result = finetune(load_model(source, torch.float32), load_tokenizer(source), [r["text"] for r in rows],
                  [r["label"] for r in rows], FinetuneConfig(dtype="float32", checkpoint_steps=20, logging_steps=1),
                  torch.float32, out, on_log=on_log,
                  on_resume=lambda checkpoint: log.write(json.dumps({"resumed_from": Path(checkpoint).name}) + "\\n"))
log.write(json.dumps({"inexact": result.resumed_inexact, "train_loss": result.train_loss}) + "\\n")
"""


def _train(out: Path, log: Path, hang_at: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRAINER, str(out), str(log), str(hang_at)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _kill_when(proc: subprocess.Popen, ready, after_s: float = 0.0) -> None:
    deadline = time.time() + 1800
    while not ready():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.1)
    time.sleep(after_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _complete(out: Path, step: int) -> bool:
    try:
        state = json.loads((out / "trainer" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return "TrainClock" in state.get("stateful_callbacks", {})


def _entries(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _losses(entries: list[dict]) -> dict[int, tuple[float, float]]:
    return {e["step"]: (e["loss"], e["lr"]) for e in entries if "step" in e}


@pytest.mark.slow
def test_sigkilled_training_at_its_real_size_resumes_to_the_uninterrupted_one(tmp_path):
    """Killed 2 s after a checkpoint in the first epoch (40), 2 s after one in the second (80), and while one is
    being written (100, after its weights, optimizer and RNG state): each resume goes on with the same loss and
    learning rate at every step as the uninterrupted training, to the same adapter within 1e-6."""
    whole_log, log = tmp_path / "whole.jsonl", tmp_path / "killed-{}.jsonl"
    proc = _train(tmp_path / "whole", whole_log)
    assert proc.wait() == 0
    whole = _losses(_entries(whole_log))
    assert sorted(whole) == list(range(1, 115))

    out = tmp_path / "killed"
    _kill_when(_train(out, Path(str(log).format(1))), lambda: _complete(out, 40), after_s=2)
    _kill_when(_train(out, Path(str(log).format(2))), lambda: _complete(out, 80), after_s=2)
    _kill_when(_train(out, Path(str(log).format(3)), hang_at=100), lambda: (out / "saving").exists())
    assert (out / "trainer" / "checkpoint-100").is_dir() and not _complete(out, 100)
    assert _train(out, Path(str(log).format(4))).wait() == 0

    first = _losses(_entries(Path(str(log).format(1))))
    assert min(first) == 1 and max(first) >= 40 and all(first[step] == whole[step] for step in first)
    for part, checkpoint, last in [(2, 40, None), (3, 80, 100), (4, 80, 114)]:
        entries = _entries(Path(str(log).format(part)))
        assert entries[0] == {"resumed_from": f"checkpoint-{checkpoint}"}, (part, entries[:1])
        steps = _losses(entries)
        assert min(steps) == checkpoint + 1 and (last is None or max(steps) >= last), (part, sorted(steps))
        for step, (loss, lr) in steps.items():
            assert loss == pytest.approx(whole[step][0], abs=1e-6) and lr == whole[step][1], (part, step)
    assert _entries(Path(str(log).format(4)))[-1]["inexact"] is None
    assert _entries(Path(str(log).format(4)))[-1]["train_loss"] == pytest.approx(_entries(whole_log)[-1]["train_loss"],
                                                                                  abs=1e-6)
    a, b = _adapter_at(tmp_path / "whole"), _adapter_at(out)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def _adapter_at(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))
