"""What a stored stage's key covers: the code its stage runs (not the report's), and the machine that timed it."""

import shutil
from pathlib import Path

from pipeline.recipe import stages


def _version_of(package: Path) -> str:
    stages.code_version.cache_clear()
    old, stages._PACKAGE = stages._PACKAGE, package
    try:
        return stages.code_version()
    finally:
        stages._PACKAGE = old
        stages.code_version.cache_clear()


def test_the_code_version_covers_the_stage_folders_and_not_the_report(tmp_path):
    """Which edits re-measure is decided by folder: pricing, reporting, tracking and the apps re-measure nothing;
    a change anywhere in a stage folder, a new module there included, invalidates every stored stage."""
    package = tmp_path / "pipeline"
    shutil.copytree(Path(stages.__file__).parents[1], package, ignore=shutil.ignore_patterns("__pycache__"))
    before = _version_of(package)
    for reporting in ("report/summary.py", "report/html.py", "economics/costing.py", "economics/catalog.py",
                      "tracking/mlflow_store.py", "apps/serve.py", "cli.py", "report/new_chart.py"):
        with open(package / reporting, "a") as f:
            f.write("\n# a change to how results are priced, reported or logged\n")
        assert _version_of(package) == before, reporting
    for running in ("training/lora.py", "backends/local.py", "measure/scoring.py", "task/prompts.py",
                    "recipe/evaluate.py", "experiment/arms.py", "models/loading.py"):
        text = (package / running).read_text()
        (package / running).write_text(text + "\n# a change to what a stage computes\n")
        assert _version_of(package) != before, running
        (package / running).write_text(text)
    assert _version_of(package) == before
    (package / "backends" / "new_backend.py").write_text("X = 1\n")  # new code in a stage folder counts
    assert _version_of(package) != before


def test_the_machine_names_the_processor_threads_gpu_and_library_versions():
    import torch
    import transformers

    here = stages.machine()
    assert here["cpu"] and here["threads"] == torch.get_num_threads()
    assert here["torch"] == torch.__version__ and here["transformers"] == transformers.__version__
    assert here["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def test_the_retry_notice_speaks_for_the_tracking_server_only(capsys):
    import logging

    from pipeline.tracking.mlflow_store import _RetryNotice

    notice = _RetryNotice("http://user:secret@127.0.0.1:5000")

    def record(msg, *args):
        return logging.LogRecord("urllib3.connectionpool", logging.WARNING, __file__, 1, msg, args, None)

    notice.emit(record("Retrying (%r) after connection broken by '%r': %s", "Retry(total=6)",
                       ConnectionRefusedError(), "/api/2.0/mlflow/runs/log-batch"))
    notice.emit(record("Retry: %s", "/api/2.0/mlflow/runs/create"))
    notice.emit(record("Retrying (%r) after connection broken by '%r': %s", "Retry(total=6)",
                       ConnectionRefusedError(), "/v1/chat/completions"))  # another client's request
    notice.emit(record("Starting new HTTP connection (%d): %s:%s", 1, "127.0.0.1", 5000))
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "roi: note: tracking server http://user:***@127.0.0.1:5000 did not answer (ConnectionRefusedError); "
        "retrying with backoff",
        "roi: note: tracking server http://user:***@127.0.0.1:5000 did not answer (an error status); "
        "retrying with backoff"]


def test_recomputing_ignores_earlier_stages_but_reuses_one_finished_in_this_run(tmp_path):
    from pipeline.recipe.stages import StageStore

    StageStore(tmp_path).finish("finetune-a", {"train": 1})
    assert StageStore(tmp_path).load("finetune-a") == {"train": 1}
    forced = StageStore(tmp_path, recompute=True)  # roi run --force
    assert forced.load("finetune-a") is None
    forced.finish("finetune-a", {"train": 2})
    assert forced.load("finetune-a") == {"train": 2}  # a second arm with the same adapter does not retrain it
    assert forced.load("eval-b") is None
