"""Finished stages, stored under a content hash of their inputs, so a re-run reuses them.

A stage's key hashes everything its output depends on: the data's content hash, the config
sections that matter to it, and the code version. A stage directory counts only once its
`done.json` is written, which happens last and atomically: a run killed midway leaves no
stage that looks finished (training leaves checkpoints, which the next run resumes from).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parents[1]
DONE = "done.json"

# The folders whose code can change what a stage produces (a measurement, a trained adapter). Pricing,
# reporting, tracking and the apps only read what stages produced: a new report layout re-measures nothing.
STAGE_CODE = ("experiment", "task", "models", "backends", "training", "measure", "recipe")


def stage_code_files() -> list[Path]:
    """The source files in the stage-code folders, in a stable order."""
    return sorted(p for folder in STAGE_CODE for p in (_PACKAGE / folder).rglob("*.py"))


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the source the stages run (the STAGE_CODE folders)."""
    digest = hashlib.sha256()
    for path in stage_code_files():
        digest.update(path.relative_to(_PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def machine() -> dict[str, Any]:
    """What a timing depends on besides the code: the processor, the threads torch uses, the GPU, and the
    versions of the libraries that run the model. A stored measurement is reused only where all match."""
    import platform
    from importlib.metadata import version

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": version("transformers"), "peft": version("peft")}


def stage_key(kind: str, **inputs: Any) -> str:
    """A short, stable hash of a stage's inputs."""
    text = json.dumps({"kind": kind, "code": code_version(), **inputs}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


class StageStore:
    """Stage directories under `root` (by default `<output_dir>/stages`).

    With `recompute` (`roi run --force`), stages finished before this store was opened count as never
    finished; one finished through it is reused like any other (two arms that share an adapter train it once).
    """

    def __init__(self, root: Path, recompute: bool = False):
        self.root = root
        self.recompute = recompute
        self.finished_here: set[str] = set()

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> dict | None:
        """The stage's record, or None when it never finished (or, recomputing, not through this store)."""
        if self.recompute and key not in self.finished_here:
            return None
        done = self.path(key) / DONE
        if not done.is_file():
            return None
        try:
            return json.loads(done.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def work_dir(self, key: str) -> Path:
        """Where an unfinished stage keeps its files (and training its checkpoints) until it is done."""
        path = self.path(key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def finish(self, key: str, record: dict, files: dict[str, Path] | None = None) -> None:
        """Copy result files into the stage, then mark it done (atomic rename of the record)."""
        path = self.work_dir(key)
        for name, source in (files or {}).items():
            shutil.copy2(source, path / name)
        fd, tmp = tempfile.mkstemp(dir=path, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(tmp, path / DONE)
        self.finished_here.add(key)

    def forget(self, key: str) -> None:
        shutil.rmtree(self.path(key), ignore_errors=True)
