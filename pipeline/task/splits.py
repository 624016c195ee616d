"""Task data: split files read through `datasets`, a label set, and a content hash.

A task is a folder of split files (CSV or TSV, JSON Lines or a JSON list, Parquet) plus an optional
label file. Everything downstream sees the same shape: string columns `text` and `label` (a label name).
This module reads; the rules the data must meet, and the `roi data check` report, are in
`pipeline.task.checks`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import sys
from pathlib import Path

import datasets

from pipeline.task.schema import parse_targets, schema_and_targets
from pipeline.task.checks import as_text, check_known_labels, check_label_set, check_rows, check_texts
from pipeline.task.types import DataConfig, DataError, Label, TaskConfig, TaskData

SPLITS = ("train", "validation", "test")
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_DELIMITERS = ",;\t|"
_SNIFF_BYTES = 8192
_TEXT_TYPES = ("string", "large_string")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _note(message: str) -> None:
    """Something the user should know that is not an error: one line on stderr."""
    print(f"roi: note: {message}", file=sys.stderr)


def _builder_for(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return {"jsonl": "json"}.get(fmt, fmt)
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r} (use .csv, .tsv, .jsonl, .json or .parquet)")
    return builder


def _read_bytes(path: Path, builder: str) -> bytes:
    """The file's bytes, refused when missing, empty, blank or not UTF-8 text."""
    if not path.is_file():
        raise DataError(f"{path}: {'is a folder, not a file' if path.is_dir() else 'file not found'}")
    raw = path.read_bytes()
    if builder != "parquet":
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise DataError(f"{path}: not UTF-8 text (it is UTF-16: save it as UTF-8)")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise DataError(f"{path}: not UTF-8 text (line {line}, byte {exc.start}: "
                            f"0x{raw[exc.start]:02x}; save it as UTF-8)") from None
    if not raw:
        raise DataError(f"{path}: file is empty (no rows)")
    if not raw.strip():
        raise DataError(f"{path}: no rows (the file has only blank lines)")
    return raw


def sniff_delimiter(raw: bytes) -> str:
    """The column delimiter of a CSV among , ; tab |: csv.Sniffer on the first few KB, checked on the header."""
    sample = raw[:_SNIFF_BYTES].decode("utf-8-sig", errors="ignore")
    if len(raw) > _SNIFF_BYTES and "\n" in sample:
        sample = sample[: sample.rindex("\n") + 1]
    header = sample.lstrip("\r\n").splitlines()[0] if sample.strip() else ""
    try:
        found = csv.Sniffer().sniff(sample, delimiters=_DELIMITERS).delimiter
    except csv.Error:
        found = ""
    if found and found in header:
        return found
    return next((d for d in _DELIMITERS if d in header), ",")


def _csv_kwargs(path: Path, raw: bytes) -> dict:
    """How `datasets` reads a CSV: the sniffed delimiter, every cell as written, as a string."""
    import io

    import pandas as pd

    pandas_kwargs = {"sep": sniff_delimiter(raw), "keep_default_na": False, "skipinitialspace": True}
    try:  # the header as pandas names it (duplicates become `x.1`), so every column can be typed
        names = pd.read_csv(io.BytesIO(raw), nrows=0, **pandas_kwargs).columns
    except (ValueError, pd.errors.ParserError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"{path}: cannot be read as csv ({first})") from None
    string = datasets.Value("string")
    return {**pandas_kwargs, "features": datasets.Features({str(n): string for n in names})}


def _no_rows(path: Path, raw: bytes, builder: str) -> DataError:
    header_only = builder == "csv" and len([line for line in raw.splitlines() if line.strip()]) == 1
    return DataError(f"{path}: no rows{' (only a header line)' if header_only else ''}")


def _load_file(path: Path, fmt: str) -> tuple[datasets.Dataset, str]:
    """Read a data file through `datasets`, turning every failure into one DataError line.

    Returns the rows and how a CSV was split ("delimiter ';'"; empty for other formats).
    A CSV's cells are read as written, as strings ("007", "3.10"); other formats keep their types.
    """
    builder = _builder_for(path, fmt)
    raw = _read_bytes(path, builder)
    kwargs = _csv_kwargs(path, raw) if builder == "csv" else {}
    how = f"delimiter {kwargs['sep']!r}" if builder == "csv" else ""
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(builder, data_files={"split": str(path)}, split="split", **kwargs)
    except Exception as exc:  # datasets wraps parser errors in several types
        cause = exc.__cause__ or exc.__context__ or exc
        first = (str(cause).splitlines() or [type(cause).__name__])[0][:200]
        if "corresponds to no data" in first:
            raise _no_rows(path, raw, builder) from None
        raise DataError(f"{path}: cannot be read as {builder} ({first})") from None
    if len(ds) == 0:
        raise _no_rows(path, raw, builder)
    return ds, how


_ONE_OBJECT = "the file is one JSON object holding lists, not rows (write a JSON list of rows, or JSON Lines)"


def _holds_lists(ds: datasets.Dataset, columns) -> bool:
    """One row whose columns are lists: a JSON file written as {"text": [...], ...} or {"data": [...]}."""
    return len(ds) == 1 and any(type(ds.features[c]).__name__ in ("List", "LargeList", "Sequence") for c in columns)


def _find_column(ds: datasets.Dataset, path: Path, column: str, key: str, how: str) -> str:
    """The file's name for `column`: exact, or differing only by surrounding spaces; else one line."""
    if column in ds.column_names:
        return column
    spaced = [c for c in ds.column_names if c.strip() == column]
    if len(spaced) == 1:
        return spaced[0]
    hints = [f"has: {', '.join(ds.column_names)}"]
    close = [c for c in ds.column_names if c.strip().lower() == column.strip().lower()]
    if close:
        hints.append(f"did you mean {close[0]!r} (task.{key})?")
    if how:
        hints.append(f"read with {how}")
    if _holds_lists(ds, ds.column_names):
        hints.append(_ONE_OBJECT)
    raise DataError(f"{path}: missing column {column!r} ({'; '.join(hints)})")


def _column_text(ds: datasets.Dataset, path: Path, column: str) -> list[str | None]:
    """A column's cells as text; class-label ids (a Parquet file written by `datasets`) as their names."""
    feature = ds.features[column]
    cells = ds[column][:]  # a list at once: iterating the column decodes row by row, about 100x slower
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(v) if v is not None and v >= 0 else None for v in cells]
    return [as_text(v, f"{path}: row {i + 1}: {column!r}") for i, v in enumerate(cells)]


def _non_text_kind(ds: datasets.Dataset, column: str) -> str:
    """What a text or label column holds if not text: its type (JSON, Parquet), or "only numbers" (CSV)."""
    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return ""
    dtype = getattr(feature, "dtype", type(feature).__name__.lower())
    if dtype not in _TEXT_TYPES:
        return dtype
    values = [v.strip() for v in ds[column][:] if v is not None and v.strip()]
    return "only numbers" if values and all(_NUMBER.fullmatch(v) for v in values) else ""


def read_texts(path: Path, fmt: str, text_column: str) -> list[str]:
    """The texts of a file without labels (`task.splits.unlabelled`)."""
    ds, how = _load_file(path, fmt)
    texts = _column_text(ds, path, _find_column(ds, path, text_column, "text_column", how))
    check_texts(path, texts)
    return texts


def read_split(path: Path, fmt: str, text_column: str, label_column: str,
               notes: list[str] | None = None, task_type: str = "classification") -> datasets.Dataset:
    """Read one split file into a Dataset with string columns `text` and `label` (labels stripped; an extraction
    target as its compact JSON, a generation target as its text).

    A column read as text that was not (numbers, say) is noted: added to `notes`, or printed if none is given.
    """
    if text_column == label_column:
        raise DataError(f"{path}: task.text_column and task.label_column are both {text_column!r} "
                        "(the text and the label need two columns)")
    ds, how = _load_file(path, fmt)
    columns = {key: _find_column(ds, path, name, key, how)
               for key, name in (("text_column", text_column), ("label_column", label_column))}
    if _holds_lists(ds, columns.values()):
        raise DataError(f"{path}: {_ONE_OBJECT}")
    texts = _column_text(ds, path, columns["text_column"])
    labels = _targets(ds, path, columns["label_column"], task_type)
    if task_type == "classification":
        check_rows(path, texts, labels)
    else:
        check_texts(path, texts)
    typed = (columns["text_column"],) if task_type == "extraction" else columns.values()
    cast = [f"{c!r} ({kind})" for c in typed if (kind := _non_text_kind(ds, c))]
    if cast:
        message = f"{path}: column{'s' if len(cast) > 1 else ''} {', '.join(cast)} read as text"
        if notes is None:
            _note(message)
        else:
            notes.append(message)
    return _with_labels(texts, labels)


def _with_labels(texts: list[str] | datasets.Dataset, labels: list[str]) -> datasets.Dataset:
    """The split's shape downstream: string columns `text` and `label`."""
    texts = texts["text"][:] if isinstance(texts, datasets.Dataset) else texts
    string = datasets.Value("string")
    return datasets.Dataset.from_dict({"text": texts, "label": labels},
                                      features=datasets.Features({"text": string, "label": string}))


def _targets(ds: datasets.Dataset, path: Path, column: str, task_type: str) -> list[str | None]:
    """The target column as text: a label (stripped), an extraction target's compact JSON, a reference text."""
    if task_type == "extraction":
        return [json.dumps(t, ensure_ascii=False, separators=(",", ":"))
                for t in parse_targets(path, ds[column][:], column)]
    values = _column_text(ds, path, column)
    if task_type == "generation":
        for i, value in enumerate(values):
            if value is None or not value.strip():
                raise DataError(f"{path}: row {i + 1}: empty reference text in {column!r}")
    return [value.strip() if value is not None else None for value in values]


def _label_entry(path: Path, i: int, entry: object) -> Label:
    name = entry.get("name") if isinstance(entry, dict) else entry
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise DataError(f"{path}: entry {i + 1}: expected a name or {{name, description}}")
    description = entry.get("description", "") if isinstance(entry, dict) else ""
    return Label(str(name).strip(), str(description or ""))


def read_labels(task: TaskConfig, train: datasets.Dataset | None, train_file: Path | None = None) -> list[Label]:
    """The label set: from a label file, an inline list, or the labels seen in train; checked by the parser's eye."""
    if isinstance(task.labels, list):
        labels = [Label(str(name).strip()) for name in task.labels]
        check_label_set("task.labels", [l.name for l in labels], [f"entry {i + 1}" for i in range(len(labels))])
        return labels
    if task.labels is None:
        if train is None:
            raise DataError(f"{task.path}: no label file and no train split to take labels from")
        first: dict[str, int] = {}
        for i, name in enumerate(train["label"][:]):
            first.setdefault(name, i)
        names = sorted(first)
        check_label_set(str(train_file or "train"), names, [f"row {first[n] + 1}" for n in names])
        return [Label(name) for name in names]
    path = task.path / task.labels
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a non-empty JSON list of labels")
    labels = [_label_entry(path, i, entry) for i, entry in enumerate(entries)]
    check_label_set(str(path), [l.name for l in labels], [f"entry {i + 1}" for i in range(len(labels))])
    return labels


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
    _check_distinct_files(files)
    unlabelled_file = files.pop("unlabelled", None)
    notes: list[str] = []
    target_column = task.target_column or task.label_column
    splits = {split: read_split(path, task.format, task.text_column, target_column, notes, task.type)
              for split, path in files.items()}
    labels, schema = [], None
    if task.type == "classification":
        labels = read_labels(task, splits["train"], files["train"])
        names = [label.name for label in labels]
        label_source = (task.labels if isinstance(task.labels, str) else "task.labels" if task.labels is not None
                        else f"the labels seen in {files['train'].name}")
        for split, ds in splits.items():
            check_known_labels(files[split], ds["label"][:], names, label_source)
    elif task.type == "extraction":
        schema, targets = schema_and_targets(task, {split: ds["label"][:] for split, ds in splits.items()}, files,
                                             notes)
        splits = {split: _with_labels(ds, targets[split]) for split, ds in splits.items()}
    splits = _make_splits(splits, files["train"], task, data)
    unlabelled = read_texts(unlabelled_file, task.format, task.text_column) if unlabelled_file else None
    if unlabelled_file:
        files["unlabelled"] = unlabelled_file
    for note in notes:  # only once the task is sound: an error stays the one line printed
        _note(note)
    label_text = json.dumps([[l.name, l.description] for l in labels]) + (json.dumps(schema) if schema else "")
    # Sorted: the order a config lists its splits in (a YAML writer may sort them) is not the data's identity.
    settings = json.dumps(
        {"splits": task.splits, "columns": [task.text_column, target_column], "train_limit": data.train_limit,
         "type": task.type, "instruction": task.instruction if task.type == "generation" else None,
         "seed": data.seed, "test_size": task.test_size, "validation_size": task.validation_size}, sort_keys=True
    )
    content_hash = hash_files([files[split] for split in sorted(files)], label_text + settings)
    return TaskData(task.name or Path(task.path).resolve().name, labels, splits, files, content_hash, notes=notes,
                    unlabelled=unlabelled, type=task.type, schema=schema)


def _check_distinct_files(files: dict[str, Path]) -> None:
    seen: dict[Path, str] = {}
    for split in sorted(files, key=(*SPLITS, "unlabelled").index):
        path = files[split]
        other = seen.setdefault(path.resolve(), split)
        if other != split:
            raise DataError(f"{path}: named for both the {other} and the {split} split (task.splits): "
                            f"every {split} row would also be a {other} row")


def _make_splits(splits: dict[str, datasets.Dataset], train_file: Path, task: TaskConfig,
                 data: DataConfig) -> dict[str, datasets.Dataset]:
    """Seeded test/validation splits cut from train where no file gives them; then the train limit."""
    for split, size in (("test", task.test_size), ("validation", task.validation_size)):
        if split in splits or (split == "validation" and size == 0):
            continue
        try:
            parts = splits["train"].train_test_split(test_size=size, seed=data.seed)
        except ValueError:
            n = len(splits["train"])
            raise DataError(f"{train_file}: only {n} row{'s' if n != 1 else ''}: too few to cut a {split} split from "
                            f"(task.{split}_size={size}); give a {split} file in task.splits") from None
        splits["train"], splits[split] = parts["train"], parts["test"]
    if data.train_limit is not None and data.train_limit < len(splits["train"]):
        splits["train"] = splits["train"].shuffle(seed=data.seed).select(range(data.train_limit))
    return splits


def eval_rows(task: TaskData, limit: int | None, seed: int, shuffled: bool = False) -> datasets.Dataset:
    """The test rows every arm is scored on: all, or a seeded sample of `limit` (splits may be sorted); with
    `shuffled`, all of them in that seeded order too (the order a sequential evaluation takes them in)."""
    test = task.splits["test"]
    if limit is not None and limit > len(test):
        where = task.files.get("test", "the test split")
        raise DataError(f"eval.limit: {limit} is larger than the test split ({where}: {len(test)} rows)")
    if (limit is None or limit == len(test)) and not shuffled:
        return test
    return test.shuffle(seed=seed).select(range(limit or len(test)))


# --- a bare folder as a task ------------------------------------------------------------------


def task_config_for_folder(folder: Path) -> TaskConfig:
    """Guess a TaskConfig for a bare folder: split files by name, common column and label-file names; a folder
    with a `schema.json` is an extraction whose targets are the column of JSON objects."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    splits: dict[str, str] = {}
    for split in SPLITS:
        for ext in (".jsonl", ".csv", ".tsv", ".parquet", ".json"):
            if (folder / f"{split}{ext}").is_file():
                splits[split] = f"{split}{ext}"
                break
    if "train" not in splits:
        raise DataError(f"{folder}: no train.jsonl, train.csv, train.tsv, train.parquet or train.json")
    train = _load_file(folder / splits["train"], "auto")[0]
    first = train.column_names
    if (folder / "schema.json").is_file():
        # The targets: the one column besides the text (objects read as a struct, or as Json where rows' keys
        # differ; JSON text as a string).
        others = [c for c in first if c != "text"]
        if len(others) != 1:
            raise DataError(f"{folder / splits['train']}: a folder with schema.json is an extraction, but which column "
                            f"holds the targets ({', '.join(others) or 'none besides text'})? Give a config with "
                            "task.target_column")
        return TaskConfig(name=folder.name, path=folder, splits=splits, type="extraction", text_column="text",
                          target_column=others[0], schema="schema.json")
    label_column = next((c for c in ("label", "category", "intent") if c in first), "label")
    label_file = next((n for n in ("labels.json", "categories.json") if (folder / n).is_file()), None)
    return TaskConfig(
        name=folder.name, path=folder, splits=splits, text_column="text", label_column=label_column, labels=label_file
    )
