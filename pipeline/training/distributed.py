"""Data-parallel LoRA training on several processes (`roi run --processes N`, `finetune.processes=N`).

`roi run` stays one process: it reads the data, evaluates every arm, logs to MLflow and writes the
stages. Only the training of a fine-tuned arm is handed to torchrun, which starts N processes (one
per GPU with NCCL, or N CPU processes with gloo) that train through the Trainer's own distributed
support (accelerate). Rank 0 saves the adapter, its training figures and its log; every rank then
exits. The recipe loads the adapter from there, exactly as it loads a stored one.

`finetune.batch_size` is the global batch: each process takes batch_size / N rows per step, so the
optimizer sees the same batch, and the same learning rate applies, whatever N is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.experiment.config import FinetuneConfig, ModelConfig
from pipeline.models.loading import ModelError

JOB, RESULT, LOG, OUTPUT = "job.json", "result.json", "train_log.jsonl", "processes.log"


def launch_command(job_file: Path, processes: int, port: int) -> list[str]:
    """torchrun on this machine. (`accelerate launch` starts several processes only for GPUs, or for CPUs
    through mpirun; torchrun does both, and the Trainer's accelerate state reads the same environment.)"""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "pipeline.training.distributed", str(job_file)]


def train_on_processes(model: ModelConfig, prompts: list[str], completions: list[str], cfg: FinetuneConfig,
                       dtype: torch.dtype, out_dir: Path,
                       on_log: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Any]:
    """Train on `cfg.processes` processes; returns rank 0's figures (train_time_s, train_tokens,
    train_loss, trainer_args, resumed_from) once every process has exited cleanly. The adapter is
    in `out_dir/adapter`; `on_log` receives rank 0's log entries afterwards, in order."""
    from pipeline.loopback import free_port

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (RESULT, LOG, *(p.name for p in out_dir.glob("error-rank*.txt"))):
        (out_dir / stale).unlink(missing_ok=True)
    job = {"model": model.model_dump(mode="json"), "prompts": prompts, "completions": completions,
           "finetune": cfg.model_dump(mode="json"), "dtype": str(dtype).removeprefix("torch."),
           "out_dir": str(out_dir)}
    (out_dir / JOB).write_text(json.dumps(job))
    port = free_port()
    # Each process gets its share of the cores: N processes with all cores' threads each thrash.
    threads = max(1, (os.cpu_count() or 1) // cfg.processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), ROI_TRAIN_THREADS=str(threads))
    if not torch.cuda.is_available():
        # Without it accelerate sees ranks but no GPU and trains each process alone (DistributedType.NO).
        env["ACCELERATE_USE_CPU"] = "true"
    try:
        returncode = _run_launcher(launch_command(out_dir / JOB, cfg.processes, port), env, out_dir / OUTPUT)
    finally:
        (out_dir / JOB).unlink(missing_ok=True)  # it holds every training row; the adapter and the log stay
    if returncode != 0 or not (out_dir / RESULT).is_file():
        errors = sorted(out_dir.glob("error-rank*.txt"))  # a rank's own exception, not torchrun's summary
        lines = (errors[0] if errors else out_dir / OUTPUT).read_text(errors="replace").strip().splitlines()
        raise ModelError(f"training on {cfg.processes} processes failed (exit {returncode}): "
                         f"{(lines[-1] if lines else 'no output').strip()[:200]}; full output: {out_dir / OUTPUT}")
    if on_log and (out_dir / LOG).is_file():
        for line in (out_dir / LOG).read_text().splitlines():
            entry = json.loads(line)
            on_log(entry["values"], entry["step"])
    figures = json.loads((out_dir / RESULT).read_text())
    if figures.get("world_size") != cfg.processes:
        raise ModelError(f"training was asked for {cfg.processes} processes but ran on {figures.get('world_size')}; "
                         f"see {out_dir / OUTPUT}")
    return figures


def _run_launcher(command: list[str], env: dict[str, str], output_file: Path) -> int:
    """Run torchrun in its own process group; on Ctrl-C or any error, stop it and every rank it started, so no
    orphaned process goes on writing into the stage folder a re-run resumes from."""
    import signal

    with open(output_file, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return process.wait()
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            raise


def _worker(job_file: Path) -> None:
    """One training process (started by torchrun): all ranks train, rank 0 writes the results."""
    from pipeline.models.loading import load_model, load_tokenizer, resolve_source
    from pipeline.training.lora import finetune

    torch.set_num_threads(int(os.environ.get("ROI_TRAIN_THREADS", "1")))
    job = json.loads(job_file.read_text())
    out_dir = Path(job["out_dir"])
    spec = ModelConfig(**job["model"])
    source = resolve_source(spec)
    dtype = getattr(torch, job["dtype"])
    model = load_model(source, dtype, spec.trust_remote_code).to(dtype)
    tokenizer = load_tokenizer(source, spec.trust_remote_code)
    rank = int(os.environ.get("RANK", "0"))
    log = open(out_dir / LOG, "a") if rank == 0 else None

    def on_log(values: dict[str, float], step: int) -> None:
        log.write(json.dumps({"values": values, "step": step}) + "\n")
        log.flush()

    result = finetune(model, tokenizer, job["prompts"], job["completions"], FinetuneConfig(**job["finetune"]),
                      dtype, out_dir, on_log=on_log if log else None)
    if rank == 0:
        log.close()
        figures = {"train_time_s": result.train_time_s, "train_tokens": result.train_tokens,
                   "train_loss": result.train_loss, "trainer_args": result.trainer_args,
                   "resumed_from": result.resumed_from, "resumed_inexact": result.resumed_inexact,
                   "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}
        # Written last: its presence tells the recipe that training finished.
        (out_dir / RESULT).write_text(json.dumps(figures))


if __name__ == "__main__":
    job = Path(sys.argv[1])
    try:
        _worker(job)
    except BaseException as exc:
        # The one line the recipe reports; torchrun's own summary names only the failed rank.
        (job.parent / f"error-rank{os.environ.get('RANK', '0')}.txt").write_text(
            f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}\n")
        raise
