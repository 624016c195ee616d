"""Shared fixtures: the real default model and tokenizer, loaded once per session."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

from pipeline.loopback import free_port  # noqa: F401  (the tests' port helper)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Fixtures that load the real model, run `roi` end to end or train: a test using one is marked `model` and left
# out of `make test-fast` (the developer's inner loop); `make test` runs everything.
MODEL_FIXTURES = {"model_fp32", "roi_env", "tiny_run", "model", "trained", "engineered", "served", "server",
                  "backend", "bf16_model"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@functools.cache
def _store_template() -> Path:
    """An empty MLflow sqlite store whose tables MLflow made, once per session; removed at exit."""
    import atexit
    import shutil
    import tempfile

    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="roi-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    here = os.getcwd()
    os.chdir(folder)  # the default experiment's artifact folder is made relative to the working folder
    try:
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    finally:
        os.chdir(here)
    return folder / "mlflow.db"


def sqlite_store(db: Path) -> str:
    """The tracking URI of an MLflow sqlite store at `db`, empty where there is none yet. MLflow makes a new
    store's tables on first use (its migrations, ~2 s each time); here each new store is a copy of one made once
    per session."""
    import shutil

    if not db.exists():
        shutil.copyfile(_store_template(), db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="session")
def tokenizer():
    from pipeline.experiment.config import ModelConfig
    from pipeline.models.loading import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source(ModelConfig()))


@pytest.fixture(scope="session")
def model_fp32():
    import torch

    from pipeline.experiment.config import ModelConfig
    from pipeline.models.loading import load_model, resolve_source

    return load_model(resolve_source(ModelConfig()), torch.float32)


@pytest.fixture
def roi_env(tmp_path):
    """Environment for running the `roi` CLI against a private sqlite MLflow store."""
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = sqlite_store(tmp_path / "mlflow.db")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def roi(*args: str, env=None, cwd=None, timeout=900):
    """Run the CLI as a user would; returns CompletedProcess with text output."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=timeout)


# A tiny but real run of the default experiment: real model, real training steps, a real MLflow store.
TINY = ["eval.limit=6", "data.train_limit=48", "finetune.max_steps=3", "finetune.batch_size=8",
        "prompts.few_shot_k=4", "eval.uncached_sample=2", "eval.warmup=1",
        "eval.max_new_tokens=8", "finetune.logging_steps=1"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`roi run experiments/default.yaml TINY` once per session, from a folder outside the repo (the config's
    relative paths must still resolve against the project): (env, folder, result, seconds)."""
    import time

    tmp = tmp_path_factory.mktemp("e2e")
    env = dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp / "mlflow.db"), PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    result = roi("run", str(ROOT / "experiments" / "default.yaml"), *TINY, f"output_dir={tmp / 'runs'}", env=env,
                 cwd=tmp)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return env, tmp, result, elapsed


def wait_for_health(base_url: str, process, timeout: float, what: str) -> None:
    """Poll `base_url/health` until it answers; fail naming `what` if the process exits or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{base_url}/health", timeout=2)
            return
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None, f"{what} did not start"
            time.sleep(1)


class Served:
    """`roi serve ARGS` as a subprocess on a free loopback port; a context manager that waits for
    /health and always stops the server."""

    def __init__(self, *args: str, env=None, log_dir=None, timeout: float = 240):
        self.port = free_port()
        self.args, self.env, self.timeout = args, env, timeout
        self.log_dir = Path(log_dir or ROOT)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "Served":
        import subprocess
        import time
        import urllib.request

        self.stderr = self.log_dir / f"serve-{self.port}.err"
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", *self.args, "--host",
                                          "127.0.0.1", "--port", str(self.port)], cwd=ROOT,
                                         stdout=subprocess.DEVNULL, stderr=err, env=self.env)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError(f"roi serve did not start: {self.stderr.read_text()[-2000:]}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
