"""MLflow at the edge: where runs go, the parent/child run layout, and prompt registration."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

DEFAULT_URI = "sqlite:///mlflow.db"
ROLE_TAG = "roi.role"


class TrackingError(Exception):
    """The tracking store cannot be used; phrased as one line naming the URI."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else an sqlite file in the working folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def redact(uri: str) -> str:
    """The URI with any password removed, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(experiment: str) -> str:
    """Point MLflow at the store and check it answers, before any expensive work starts."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    # transformers' MLflow callback reads the environment, not mlflow's global state.
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if uri.startswith("http"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        mlflow.set_experiment(experiment)
    except Exception as exc:  # mlflow raises many types for an unreachable or broken store
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise TrackingError(f"tracking store {redact(uri)} is not usable: {first.replace(uri, redact(uri))}") from None
    return uri


@contextmanager
def start_run(name: str, nested: bool = False):
    """mlflow.start_run, except that Ctrl-C ends the run as KILLED rather than FAILED."""
    with mlflow.start_run(run_name=name, nested=nested) as active:
        try:
            yield active
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise


def git_commit(folder: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def log_params(params: dict[str, Any]) -> None:
    """Log params in batches (MLflow caps a batch at 100), values as short strings."""
    items = [(k, "" if v is None else str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start : start + 100]))


def register_prompt(name: str, template: str | list[dict[str, str]], tags: dict[str, str], run_id: str) -> str:
    """Register the template in the Prompt Registry (a new version only when it changed); link it to the run."""
    client = MlflowClient()
    version = None
    try:
        latest = mlflow.genai.load_prompt(f"prompts:/{name}@latest")
        if latest.template == template:
            version = latest
    except Exception:  # no such prompt yet
        version = None
    if version is None:
        version = mlflow.genai.register_prompt(name=name, template=template, commit_message="registered by roi run",
                                               tags=tags)
    client.link_prompt_version_to_run(run_id, version)
    return f"prompts:/{name}/{version.version}"


def log_dataset(frame: Any, source: str, name: str, context: str) -> None:
    dataset = mlflow.data.from_pandas(frame, source=source, name=name, targets="label")
    mlflow.log_input(dataset, context=context)


def find_parent_run(experiment: str, run_id: str | None = None) -> tuple[Any, list[Any]]:
    """A parent run (the latest finished one unless `run_id` is given) and its arm runs."""
    client = MlflowClient()
    if run_id:
        parent = client.get_run(run_id)
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise TrackingError(f"experiment {experiment!r} not found in {redact(tracking_uri())}")
        runs = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'parent' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if not runs:
            raise TrackingError(f"experiment {experiment!r} has no finished roi run in {redact(tracking_uri())}")
        parent = runs[0]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return parent, children
