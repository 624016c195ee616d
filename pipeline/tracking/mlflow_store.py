"""MLflow at the edge: where runs go, the parent/child run layout, and prompt registration."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
ROLE_TAG = "roi.role"
# Where `roi ui` / `make ui` serve a local store; an http tracking URI is its own UI.
LOCAL_UI = "http://127.0.0.1:5000"

# What the MLflow UI reads (checked against MLflow 3.17's web app):
# - The experiment kind picks the landing page in MLflow versions that read the tag; 3.17 picks it from
#   the `workflowType` URL parameter (default: GenAI), so links carry `workflowType=machine_learning`.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# - A saved runs view is an experiment tag `mlflow.sharedViewState.<id>` holding {name, createdAt, state};
#   it is listed under "Views" and opened by `viewStateShareKey=<id>` in a link.
VIEW_ID, VIEW_NAME = "roi-arms", "roi: arms side by side"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
# The columns a user needs to compare arms, in reading order (the task type's primary metric first: accuracy,
# field_f1 or chrf); the UI shows none by default.
VIEW_METRICS = ("accuracy", "latency_p50_ms", "prompt_tokens_mean", "cost_per_1k_calls_usd", "break_even_calls")
# - The runs table opens a parent's child rows by itself only when a child is tagged as an evaluation run;
#   an arm run is one: a model evaluated on the test split.
RUN_TYPE_TAG, EVALUATION_RUN = "mlflow.runType", "evaluation"


class TrackingError(UserError):
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


def connect(experiment: str, primary: str = "accuracy") -> str:
    """Point MLflow at the store and check it answers, before any expensive work starts; the experiment's saved
    view leads with the `primary` metric."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    # transformers' MLflow callback reads the environment, not mlflow's global state.
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        with _probe_settings(uri):
            exp = mlflow.set_experiment(experiment)
    except Exception as exc:  # mlflow raises many types for an unreachable or broken store
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise TrackingError(f"tracking store {redact(uri)} is not usable: {first.replace(uri, redact(uri))}") from None
    set_up_ui(exp, primary)
    if uri.startswith("http"):
        _say_when_retrying(uri)
    return exp.experiment_id


# The tracking server's REST and artifact-proxy paths: the requests the retry notice speaks for.
MLFLOW_PATHS = ("/api/2.0/mlflow", "/ajax-api/", "/api/3.0/mlflow", "mlflow-artifacts")


class _RetryNotice(logging.Handler):
    """One line on stderr each time MLflow's HTTP client retries a request: a run waiting out a server restart
    says so instead of looking hung. (urllib3 logs retries to a logger that prints nowhere by default.)"""

    def __init__(self, uri: str):
        super().__init__(logging.DEBUG)
        self.uri = redact(uri)

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        url = str(args[-1]) if args else ""
        if not isinstance(record.msg, str) or not any(p in url for p in MLFLOW_PATHS):
            return  # another library's request, not the tracking server's
        if record.msg.startswith("Retrying ("):  # a connection refused, reset or timed out
            reason = type(args[1]).__name__ if len(args) > 1 else "no answer"
        elif record.msg == "Retry: %s":  # a retried status: 429, 500, 502, 503, 504
            reason = "an error status"
        else:
            return
        print(f"roi: note: tracking server {self.uri} did not answer ({reason}); retrying with backoff",
              file=sys.stderr, flush=True)


def _say_when_retrying(uri: str) -> None:
    pool_log = logging.getLogger("urllib3.connectionpool")
    for handler in pool_log.handlers:
        if isinstance(handler, _RetryNotice):
            handler.uri = redact(uri)  # connected again, perhaps elsewhere
            return
    pool_log.addHandler(_RetryNotice(uri))
    # Status retries are logged at debug level; the handler passes on everything else.
    pool_log.setLevel(logging.DEBUG)


@contextmanager
def _probe_settings(uri: str):
    """For the first request only: no retries and a short timeout, so a wrong URI fails in seconds, not after
    MLflow's ~4 minutes of backoff. Afterwards the user's (or MLflow's default) retries apply again: a server
    that restarts or answers 503 during a run is retried with backoff instead of failing the run."""
    if not uri.startswith("http"):
        yield
        return
    probe = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {name: os.environ.get(name) for name in probe}
    os.environ.update({name: saved[name] or value for name, value in probe.items()})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def arms_view_state(primary: str = "accuracy") -> dict[str, Any]:
    """The saved view's state: the comparison columns in the runs table, in order, newest run first."""
    # The tag says `never` where the break-even metric is absent because there is none.
    names = (primary, *VIEW_METRICS[1:])
    columns = [f"metrics.`{name}`" for name in names] + ["tags.`break_even`"]
    return {"selectedColumns": columns, "columnOrder": columns, "orderByKey": "attributes.start_time",
            "orderByAsc": False}


def set_up_ui(exp: Any, primary: str = "accuracy") -> None:
    """Tag the experiment as model development and give it the arms view (written only when it changed)."""
    tags = exp.tags or {}
    if EXPERIMENT_KIND_TAG not in tags:  # a kind the user chose in the UI stays
        mlflow.set_experiment_tag(EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    try:
        current = json.loads(tags.get(VIEW_TAG, "{}")).get("state")
    except (ValueError, AttributeError):
        current = None
    state = json.dumps(arms_view_state(primary), sort_keys=True)
    if current != state:
        mlflow.set_experiment_tag(VIEW_TAG, json.dumps(
            {"name": VIEW_NAME, "createdAt": int(time.time() * 1000), "state": state}))


def ui_link(experiment_id: str, uri: str | None = None) -> str:
    """The experiment's runs page with the arms view open, on the tracking server or on `roi ui`."""
    uri = uri or tracking_uri()
    base = uri.rstrip("/") if uri.startswith("http") else LOCAL_UI
    return (f"{redact(base)}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={VIEW_ID}")


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


def ui_server(port: int, console: Any) -> int:
    """`roi ui`: print each roi experiment's arms-view link, then run `mlflow server` on loopback until Ctrl-C.
    With an http tracking URI, that server is the UI: only the links are printed."""
    uri = tracking_uri()
    remote = uri.startswith("http")
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    try:
        experiments = {e.experiment_id: e.name for e in client.search_experiments()}
        parents = client.search_runs(list(experiments), filter_string=f"tags.`{ROLE_TAG}` = 'parent'",
                                     max_results=1000) if experiments else []
    except Exception as exc:  # an unreachable or unreadable store: say which
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise TrackingError(f"tracking store {redact(uri)} is not usable: {first}") from None
    base = uri if remote else f"http://127.0.0.1:{port}"
    for experiment_id in dict.fromkeys(r.info.experiment_id for r in parents):
        console.print(f"{experiments[experiment_id]}: {ui_link(experiment_id, base)}", soft_wrap=True)
    if not parents:
        console.print(f"no roi runs in {redact(uri)} yet: `roi run CONFIG` first")
    if remote:
        return 0
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    try:
        return subprocess.run(command).returncode
    except KeyboardInterrupt:
        return 0


def log_training_step(values: dict[str, float], step: int) -> None:
    """The Trainer's log under `train/` (train/loss, train/learning_rate, ...), apart from the arm's results."""
    mlflow.log_metrics({f"train/{key}": value for key, value in values.items()}, step=step)


def log_table(rows: list[dict[str, Any]], artifact_file: str) -> None:
    """A table the run page renders (mlflow.log_table), one dict per row."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    mlflow.log_table({c: [row.get(c) for row in rows] for c in columns}, artifact_file=artifact_file)


def log_params(params: dict[str, Any]) -> None:
    """Log params in batches (MLflow caps a batch at 100), values as short strings."""
    items = [(k, "" if v is None else str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start : start + 100]))


def register_prompt(name: str, template: str | list[dict[str, str]], tags: dict[str, str],
                    run_ids: list[str]) -> str:
    """Register the template in the Prompt Registry (a new version only when it changed); link it to the runs."""
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
    for run_id in run_ids:
        client.link_prompt_version_to_run(run_id, version)
    return f"prompts:/{name}/{version.version}"


def log_dataset(frame: Any, source: str, name: str, context: str) -> None:
    dataset = mlflow.data.from_pandas(frame, source=source, name=name, targets="label")
    mlflow.log_input(dataset, context=context)


def find_parent_run(experiment: str, run_id: str | None = None) -> tuple[Any, list[Any]]:
    """A parent run (the latest finished one unless `run_id` is given) and its arm runs."""
    client = MlflowClient()
    if run_id:
        try:
            parent = client.get_run(run_id)
        except Exception:  # MlflowException / RestException: no such run
            raise TrackingError(f"run {run_id} not found in {redact(tracking_uri())}") from None
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


def download_adapter(spec: str, tmp: Path) -> Path:
    """An adapter folder: the given path, or `runs:/RUN_ID/adapter` downloaded from MLflow into `tmp`
    (what `roi serve --adapter` and `roi export` take)."""
    path = Path(spec)
    if spec.startswith("runs:/"):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        uri = tracking_uri()
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(tmp), tracking_uri=uri))
        except Exception as exc:  # noqa: BLE001 - mlflow raises many kinds; each means "cannot get it"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            # A password in the URI (a postgres or http store) stays out of the message.
            raise TrackingError(f"--adapter {spec}: cannot download it from {redact(uri)} "
                                f"({first.replace(uri, redact(uri))})") from None
    if not (path / "adapter_config.json").is_file():
        raise TrackingError(f"--adapter {spec}: {path} is not a LoRA adapter folder (no adapter_config.json)")
    return path
