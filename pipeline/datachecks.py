"""Checks of task data: the rules it must meet at the door, and the `roi data check` report.

`pipeline.data` reads the files; the rules here judge what it read (values, rows, label sets)
and fail with one DataError line naming the file or config key, the row or entry, and the value.
`check_task` then measures a loaded task: rows per label, lengths, duplicates and overlap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.evaluation import _key as label_key  # the answer parser's matching key for a label

if TYPE_CHECKING:
    from pipeline.data import TaskData

# Longer than any context the shipped models read; in a CSV, usually an unclosed quote that swallowed rows.
MAX_TEXT_CHARS = 32_000
_PARSER_RULE = "look the same to the answer parser (case, spaces and underscores are ignored)"


class DataError(Exception):
    """A data problem, already phrased as one line naming the file and row."""


def as_text(value: object, where: str) -> str | None:
    """A cell as text: numbers as written ("3", not "3.0"), null/NaN as None; lists and objects refused."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    kind = "a list" if isinstance(value, (list, tuple)) else "an object" if isinstance(value, dict) else "not text"
    raise DataError(f"{where} is {kind} ({str(value)[:60]}), expected text")


def check_rows(path: Path, texts: list[str | None], labels: list[str | None]) -> None:
    """Every row has a text of sane length and a one-line label (labels come stripped)."""
    for i, (text, label) in enumerate(zip(texts, labels)):
        if text is None or not text.strip():
            raise DataError(f"{path}: row {i + 1}: empty text")
        if len(text) > MAX_TEXT_CHARS:
            hint = "; an unclosed quote can merge many rows into one" if path.suffix.lower() in (".csv", ".tsv") else ""
            raise DataError(f"{path}: row {i + 1}: text is {len(text):,} characters long "
                            f"(the limit is {MAX_TEXT_CHARS:,}{hint})")
        if label is None or not label.strip():
            raise DataError(f"{path}: row {i + 1}: empty label")
        if "\n" in label or "\r" in label:
            raise DataError(f"{path}: row {i + 1}: label {label!r} contains a line break "
                            "(the answer parser reads one line, so it could never match)")


def check_label_set(source: str, names: list[str], where: list[str]) -> None:
    """At least two labels, each non-empty and on one line, no two the parser would confuse.

    `source` names the file or key the labels come from; `where[i]` says where label i is in it
    ("entry 3" of a label file, "row 7" of train).
    """
    for name, place in zip(names, where):
        if not name.strip():
            raise DataError(f"{source}: {place}: label {name!r} is empty")
        if not label_key(name):
            raise DataError(f"{source}: {place}: label {name!r} is empty to the answer parser (case, spaces "
                            "and underscores are ignored)")
        if "\n" in name or "\r" in name:
            raise DataError(f"{source}: {place}: label {name!r} contains a line break "
                            "(the answer parser reads one line, so it could never match)")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        first = seen.setdefault(label_key(name), i)
        if first == i:
            continue
        if names[first] == name:
            raise DataError(f"{source}: label {name!r} is listed twice ({where[first]} and {where[i]})")
        raise DataError(f"{source}: labels {names[first]!r} ({where[first]}) and {name!r} ({where[i]}) "
                        f"{_PARSER_RULE}")
    if len(names) < 2:
        what = f"only one label ({names[0]!r})" if names else "no labels"
        raise DataError(f"{source}: {what}: nothing to classify (a task needs at least two)")


def check_known_labels(path: Path, labels: list[str], names: list[str], label_source: str) -> None:
    """Every row's label is in the label set; a near miss (`BILLING` for `billing`) is pointed out."""
    known = set(names)
    by_key = {label_key(n): n for n in names}
    for i, label in enumerate(labels):
        if label not in known:
            close = by_key.get(label_key(label))
            hint = f"; did you mean {close!r}?" if close else ""
            raise DataError(f"{path}: row {i + 1}: label {label!r} is not in the label set ({label_source}{hint})")


# --- the data check report ---------------------------------------------------------------------

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalise(text: str) -> str:
    """Lower-case, punctuation and spacing removed: the key for exact-duplicate checks."""
    return _NON_WORD.sub(" ", text.lower()).strip()


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
