"""Task data: split files read through `datasets`, a label set, and a content hash.

A task is a folder of split files (CSV, JSONL or Parquet) plus an optional label file.
Everything downstream sees the same shape: columns `text` and `label` (a label name).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from pipeline.config import DataConfig, TaskConfig

SPLITS = ("train", "validation", "test")
_BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(Exception):
    """A data problem, already phrased as one line naming the file and row."""


@dataclass
class Label:
    name: str
    description: str = ""


@dataclass
class TaskData:
    name: str
    labels: list[Label]
    splits: dict[str, datasets.Dataset]
    files: dict[str, Path]
    content_hash: str
    source_rows: dict[str, list[int]] = field(default_factory=dict)

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]


def _builder_for(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return {"jsonl": "json"}.get(fmt, fmt)
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r} (use .csv, .jsonl or .parquet)")
    return builder


def _load_file(path: Path, fmt: str) -> datasets.Dataset:
    """Read a data file through `datasets`, turning every failure into one DataError line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    builder = _builder_for(path, fmt)
    try:
        raw = path.read_bytes()
        if builder != "parquet":
            raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files={"split": str(path)}, split="split")
    except Exception as exc:  # datasets wraps parser errors in several types
        cause = exc.__cause__ or exc.__context__ or exc
        first = (str(cause).splitlines() or [type(cause).__name__])[0][:200]
        raise DataError(f"{path}: cannot be read as {builder} ({first})") from None


def read_split(path: Path, fmt: str, text_column: str, label_column: str) -> datasets.Dataset:
    """Read one split file into a Dataset with string columns `text` and `label`."""
    ds = _load_file(path, fmt)
    for column in (text_column, label_column):
        if column not in ds.column_names:
            raise DataError(f"{path}: missing column {column!r} (has: {', '.join(ds.column_names)})")
    ds = ds.select_columns([text_column, label_column])
    if (text_column, label_column) != ("text", "label"):
        ds = ds.rename_columns({text_column: "text", label_column: "label"})
    for i, (text, label) in enumerate(zip(ds["text"], ds["label"])):
        if text is None or not str(text).strip():
            raise DataError(f"{path}: row {i + 1}: empty text")
        if label is None or not str(label).strip():
            raise DataError(f"{path}: row {i + 1}: empty label")
    return ds.map(lambda r: {"text": str(r["text"]), "label": str(r["label"]).strip()})


def read_labels(task: TaskConfig, train: datasets.Dataset | None) -> list[Label]:
    """The label set: from a label file, an inline list, or the labels seen in train."""
    if isinstance(task.labels, list):
        return [Label(str(name)) for name in task.labels]
    if task.labels is None:
        if train is None:
            raise DataError(f"{task.path}: no label file and no train split to take labels from")
        return [Label(name) for name in sorted(set(train["label"]))]
    path = task.path / task.labels
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a non-empty JSON list of labels")
    labels = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            labels.append(Label(entry))
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            labels.append(Label(entry["name"], str(entry.get("description", ""))))
        else:
            raise DataError(f"{path}: entry {i + 1}: expected a name or {{name, description}}")
    names = [label.name for label in labels]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{path}: label {dup!r} is listed twice")
    return labels


def _check_labels(ds: datasets.Dataset, path: Path, names: set[str]) -> None:
    for i, label in enumerate(ds["label"]):
        if label not in names:
            raise DataError(f"{path}: row {i + 1}: label {label!r} is not in the label set")


def hash_files(paths: list[Path], extra: str = "") -> str:
    """sha256 over file contents (in order) and an extra string."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(extra.encode())
    return digest.hexdigest()


def load_task(task: TaskConfig, data: DataConfig | None = None) -> TaskData:
    """Read and validate a task; make seeded train/validation/test splits where none are given."""
    data = data or DataConfig()
    files = {split: task.path / name for split, name in task.splits.items()}
    if "train" not in files:
        raise DataError(f"{task.path}: task.splits names no train file")
    splits = {
        split: read_split(path, task.format, task.text_column, task.label_column) for split, path in files.items()
    }
    labels = read_labels(task, splits["train"])
    names = {label.name for label in labels}
    for split, ds in splits.items():
        _check_labels(ds, files[split], names)

    if "test" not in splits:
        parts = splits["train"].train_test_split(test_size=task.test_size, seed=data.seed)
        splits["train"], splits["test"] = parts["train"], parts["test"]
    if "validation" not in splits and task.validation_size > 0:
        parts = splits["train"].train_test_split(test_size=task.validation_size, seed=data.seed)
        splits["train"], splits["validation"] = parts["train"], parts["test"]
    if data.train_limit is not None and data.train_limit < len(splits["train"]):
        splits["train"] = splits["train"].shuffle(seed=data.seed).select(range(data.train_limit))
    for split, ds in splits.items():
        if len(ds) == 0:
            raise DataError(f"{files.get(split, task.path)}: split {split!r} has no rows")

    label_text = json.dumps([[l.name, l.description] for l in labels])
    settings = json.dumps(
        {"splits": task.splits, "columns": [task.text_column, task.label_column], "train_limit": data.train_limit,
         "seed": data.seed, "test_size": task.test_size, "validation_size": task.validation_size}
    )
    content_hash = hash_files(list(files.values()), label_text + settings)
    return TaskData(task.name, labels, splits, files, content_hash)


def eval_rows(task: TaskData, limit: int | None, seed: int) -> datasets.Dataset:
    """The test rows every arm is scored on: all, or a seeded sample of `limit` (splits may be sorted)."""
    test = task.splits["test"]
    if limit is not None and limit > len(test):
        where = task.files.get("test", "the test split")
        raise DataError(f"eval.limit: {limit} is larger than the test split ({where}: {len(test)} rows)")
    if limit is None or limit == len(test):
        return test
    return test.shuffle(seed=seed).select(range(limit))


# --- data check -------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalise(text: str) -> str:
    """Lower-case, punctuation and spacing removed: the key for exact-duplicate checks."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def task_config_for_folder(folder: Path) -> TaskConfig:
    """Guess a TaskConfig for a bare folder: split files by name, common column and label-file names."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    splits: dict[str, str] = {}
    for split in SPLITS:
        for ext in (".jsonl", ".csv", ".parquet", ".json"):
            if (folder / f"{split}{ext}").is_file():
                splits[split] = f"{split}{ext}"
                break
    if "train" not in splits:
        raise DataError(f"{folder}: no train.jsonl, train.csv or train.parquet")
    first = _load_file(folder / splits["train"], "auto").column_names
    label_column = next((c for c in ("label", "category", "intent") if c in first), "label")
    label_file = next((n for n in ("labels.json", "categories.json") if (folder / n).is_file()), None)
    return TaskConfig(
        name=folder.name, path=folder, splits=splits, text_column="text", label_column=label_column, labels=label_file
    )


def _word_ngrams(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = normalise(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def near_duplicate_pairs(texts: list[str], threshold: float = 0.9) -> list[tuple[int, int, float]]:
    """Pairs of texts whose TF-IDF (words and bigrams) cosine similarity is at least `threshold`."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(texts) < 2:
        return []
    matrix = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True).fit_transform(texts)
    pairs = []
    for start in range(0, matrix.shape[0], 2000):
        block = (matrix[start : start + 2000] @ matrix.T).tocoo()
        for i, j, sim in zip(block.row, block.col, block.data):
            i = int(i) + start
            if i < j and sim >= threshold:
                pairs.append((i, int(j), float(sim)))
    return pairs


@dataclass
class CheckReport:
    rows: dict[str, int]
    per_label: dict[str, dict[str, int]]
    words: dict[str, dict[str, float]]
    exact_duplicates_within: dict[str, int]
    exact_duplicates_across: list[str]
    near_duplicates: int
    near_duplicate_examples: list[str]
    test_train_5gram_overlap: float
    errors: list[str]


def check_task(task: TaskData) -> CheckReport:
    """Statistics and problems of a loaded task (see `roi data check`)."""
    import statistics

    rows = {split: len(ds) for split, ds in task.splits.items()}
    per_label = {
        label: {split: 0 for split in task.splits} for label in task.label_names
    }
    words: dict[str, dict[str, float]] = {}
    keys: dict[str, dict[str, int]] = {}
    within: dict[str, int] = {}
    errors: list[str] = []
    for split, ds in task.splits.items():
        lengths = [len(t.split()) for t in ds["text"]]
        q = statistics.quantiles(lengths, n=20) if len(lengths) > 1 else lengths * 19
        words[split] = {"min": min(lengths), "p5": q[0], "median": statistics.median(lengths), "p95": q[-1],
                        "max": max(lengths), "mean": statistics.fmean(lengths)}
        for label in ds["label"]:
            per_label[label][split] += 1
        seen: dict[str, int] = {}
        dups = 0
        for i, text in enumerate(ds["text"]):
            key = normalise(text)
            if key in seen:
                dups += 1
            else:
                seen[key] = i
        within[split] = dups
        keys[split] = seen
    across = []
    names = list(task.splits)
    for a_i, a in enumerate(names):
        for b in names[a_i + 1 :]:
            for key, row in keys[b].items():
                if key in keys[a]:
                    across.append(
                        f"{task.files.get(b, b)}: row {row + 1} duplicates {task.files.get(a, a)} row {keys[a][key] + 1}"
                    )
    errors.extend(across)

    all_texts, origin = [], []
    for split, ds in task.splits.items():
        for i, text in enumerate(ds["text"]):
            all_texts.append(text)
            origin.append((split, i))
    pairs = near_duplicate_pairs(all_texts)
    near = [(i, j, s) for i, j, s in pairs if normalise(all_texts[i]) != normalise(all_texts[j])]
    examples = [
        f"{origin[i][0]} row {origin[i][1] + 1} ~ {origin[j][0]} row {origin[j][1] + 1} (cosine {s:.2f})"
        for i, j, s in near[:5]
    ]
    overlap = 0.0
    if "test" in task.splits and "train" in task.splits:
        train_grams: set = set()
        for text in task.splits["train"]["text"]:
            train_grams |= _word_ngrams(text)
        test_texts = task.splits["test"]["text"]
        overlap = sum(1 for t in test_texts if _word_ngrams(t) & train_grams) / max(1, len(test_texts))
    return CheckReport(rows, per_label, words, within, across, len(near), examples, overlap, errors)
