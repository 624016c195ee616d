"""Shared fixtures: the real default model and tokenizer, loaded once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from pipeline.config import ModelConfig
    from pipeline.models import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source(ModelConfig()))


@pytest.fixture(scope="session")
def model_fp32():
    import torch

    from pipeline.config import ModelConfig
    from pipeline.models import load_model, resolve_source

    return load_model(resolve_source(ModelConfig()), torch.float32)


@pytest.fixture
def roi_env(tmp_path):
    """Environment for running the `roi` CLI against a private sqlite MLflow store."""
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def roi(*args: str, env=None, cwd=None, timeout=900):
    """Run the CLI as a user would; returns CompletedProcess with text output."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=timeout)
