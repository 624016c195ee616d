"""Checks of task data: the rules it must meet at the door, and the `roi data check` report.

`pipeline.task.splits` reads the files; the rules here judge what it read (values, rows, label sets)
and fail with one DataError line naming the file or config key, the row or entry, and the value.
`check_task` then measures a loaded task: rows per label, lengths, duplicates and overlap.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.task.types import DataError, TaskData, label_key

# Longer than any context the shipped models read; in a CSV, usually an unclosed quote that swallowed rows.
MAX_TEXT_CHARS = 32_000
_PARSER_RULE = "look the same to the answer parser (case, spaces and underscores are ignored)"


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
    check_texts(path, texts)
    for i, label in enumerate(labels):
        if label is None or not label.strip():
            raise DataError(f"{path}: row {i + 1}: empty label")
        if "\n" in label or "\r" in label:
            raise DataError(f"{path}: row {i + 1}: label {label!r} contains a line break "
                            "(the answer parser reads one line, so it could never match)")


def check_texts(path: Path, texts: list[str | None]) -> None:
    """Every row has a text of sane length."""
    for i, text in enumerate(texts):
        if text is None or not text.strip():
            raise DataError(f"{path}: row {i + 1}: empty text")
        if len(text) > MAX_TEXT_CHARS:
            hint = "; an unclosed quote can merge many rows into one" if path.suffix.lower() in (".csv", ".tsv") else ""
            raise DataError(f"{path}: row {i + 1}: text is {len(text):,} characters long "
                            f"(the limit is {MAX_TEXT_CHARS:,}{hint})")


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
# MinHash LSH for `near_duplicate_pairs`: permutations, bands, rows per band (see `_candidate_pairs`).
_PERMUTATIONS, _BANDS, _BAND_ROWS = 256, 64, 4
_PAIRS_PER_CHUNK = 100_000  # candidate pairs whose cosine is computed at once (about 50 MB)


def normalise(text: str) -> str:
    """Lower-case, punctuation and spacing removed: the key for exact-duplicate checks."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def _exact_key(text: str) -> bytes:
    """A 16-byte digest of `normalise(text)`: the exact-duplicate key without keeping a copy of the text."""
    return hashlib.blake2b(normalise(text).encode(), digest_size=16).digest()


def _ngram_hashes(text: str, n: int = 5) -> list[int]:
    """The text's word n-grams (after `normalise`) as 64-bit hashes, not tuples of strings.

    Python's string hash is salted per process, which is fine: the hashes are only compared
    within one check. A collision (odds below 1 in 10^7 at 100,000 rows) could only add a
    shared n-gram to a statistic.
    """
    words = normalise(text).split()
    return [hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)]


def near_duplicate_pairs(texts: Iterable[str], threshold: float = 0.9) -> list[tuple[int, int, float]]:
    """Pairs (i, j, cosine), i < j, in order, of texts whose TF-IDF (words and bigrams) cosine is at least `threshold`.

    The cosine is exact (rows of the L2-normalised TF-IDF matrix multiplied), but only for the
    candidate pairs MinHash LSH proposes (`_candidate_pairs`) rather than for all n^2/2 pairs:
    100,000 texts take seconds and well under 1 GB instead of minutes and several GB. `texts`
    can be a generator: it is read once.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = iter(texts)
    first_two = list(itertools.islice(texts, 2))
    if len(first_two) < 2:
        return []
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    matrix = vectorizer.fit_transform(itertools.chain(first_two, texts)).tocsr()
    del vectorizer  # its vocabulary (every word and bigram as a string) is not needed any more
    first, second = _candidate_pairs(matrix)
    cosines = np.empty(len(first))
    for start in range(0, len(first), _PAIRS_PER_CHUNK):
        part = slice(start, start + _PAIRS_PER_CHUNK)
        # The same products as the full self-product, summed in another order: equal to the last bit or two.
        cosines[part] = np.asarray(matrix[first[part]].multiply(matrix[second[part]]).sum(axis=1)).ravel()
    keep = cosines >= threshold
    return list(zip(first[keep].tolist(), second[keep].tolist(), cosines[keep].tolist()))


def _candidate_pairs(matrix) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (i < j, sorted) that share all MinHash values of at least one LSH band.

    Recall: each row's set of TF-IDF terms (its non-zero columns) is sketched with datasketch's
    MinHash, 256 permutations cut into 64 bands of 4, so two rows whose term sets have Jaccard
    similarity J become candidates with probability 1 - (1 - J^4)^64: 0.984 at J = 0.5, missed
    once in 7,000 at 0.6, once in 14 million at 0.69, never in practice at 0.8. A finding is a
    TF-IDF cosine >= 0.9; with unweighted terms that implies J >= 0.82 (J >= c / (2 - c) at
    cosine c), and IDF weights loosen it only a little: the least similar such pair of the 322
    in BANKING77 has J = 0.69. The threshold is deliberately that low; the price is more
    candidates, and every candidate's cosine is then computed exactly.

    The bands are matched with a sort per band, not datasketch's MinHashLSH index: its dict of
    sets per band took 12 s and 1.2 GB for 100,000 rows (32 bands); the sorts take a second.
    """
    from datasketch import MinHash

    n = matrix.shape[0]
    rows = np.flatnonzero(np.diff(matrix.indptr))  # a text without a single term has cosine 0 with all
    if rows.size < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    # The column numbers are the terms; datasketch mixes them (affine32 scheme) before permuting. One
    # sketch, cleared per row, rather than MinHash.bulk: its copy per row doubles the time.
    sketch = MinHash(num_perm=_PERMUTATIONS, seed=1, hashfunc=int, scheme="affine32")
    signatures = np.empty((rows.size, _PERMUTATIONS), np.uint32)
    for k, r in enumerate(rows):
        sketch.clear()
        sketch.update_batch(matrix.indices[matrix.indptr[r] : matrix.indptr[r + 1]].tolist())
        signatures[k] = sketch.hashvalues
    found = [np.empty(0, np.int64)]  # pair codes i * n + j, the first array sorted and unique
    for band in range(_BANDS):
        values = signatures[:, band * _BAND_ROWS : (band + 1) * _BAND_ROWS].astype(np.uint64)
        key = values[:, 0]
        for column in range(1, _BAND_ROWS):  # one 64-bit key per band; a collision only adds a candidate
            key = key * np.uint64(0x9E3779B97F4A7C15) + values[:, column]
        order = np.argsort(key, kind="stable")  # stable: within a run of equal keys, rows ascend
        key = key[order]
        starts = np.flatnonzero(key[1:] == key[:-1])
        gap = 1
        while starts.size:  # every pair within each run of equal keys, by their distance in the run
            found.append(rows[order[starts]] * n + rows[order[starts + gap]])
            gap += 1
            starts = starts[starts + gap < len(key)]
            starts = starts[key[starts + gap] == key[starts]]
        pending = sum(map(len, found[1:]))  # a pair found by several bands is here several times
        if pending > max(40 * _PAIRS_PER_CHUNK, len(found[0])) or band == _BANDS - 1:
            found = [_sorted_unique(np.concatenate(found))]
    return found[0] // n, found[0] % n


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy 2's hash-based np.unique is several times slower on millions of ints."""
    values.sort()
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if values.size else values


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
    # extraction: each field's share of rows that give it a value (not null, not empty), per split
    field_coverage: dict[str, dict[str, float]] = field(default_factory=dict)
    target_words: dict[str, dict[str, float]] = field(default_factory=dict)  # generation: reference lengths


def check_task(task: TaskData) -> CheckReport:
    """Statistics and problems of a loaded task (see `roi data check`).

    One pass over each split's texts collects lengths, exact-duplicate keys (digests) and, for
    train and test, word 5-gram hashes; the near-duplicate search reads the texts once more.
    No copy of all texts, normalised texts or n-gram tuples is kept.
    """
    rows = {split: len(ds) for split, ds in task.splits.items()}
    per_label = {
        label: {split: 0 for split in task.splits} for label in task.label_names
    }
    coverage = field_coverage(task) if task.type == "extraction" else {}
    target_words = ({split: length_stats([len(t.split()) for t in ds["label"][:]]) for split, ds in task.splits.items()}
                    if task.type == "generation" else {})
    words: dict[str, dict[str, float]] = {}
    keys: dict[str, dict[bytes, int]] = {}
    row_keys: list[bytes] = []  # every row's key, all splits in order, as the near-duplicate search numbers them
    within: dict[str, int] = {}
    grams: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, ds in task.splits.items():
        texts = ds["text"][:]  # a list at once: iterating the Column reads row by row, 100x slower
        words[split] = length_stats([len(t.split()) for t in texts])
        if per_label:
            for label in ds["label"][:]:
                per_label[label][split] += 1
        seen: dict[bytes, int] = {}
        for i, text in enumerate(texts):
            key = _exact_key(text)
            row_keys.append(key)
            seen.setdefault(key, i)
        within[split] = len(texts) - len(seen)
        keys[split] = seen
        if split in ("train", "test"):
            grams[split] = _split_ngrams(texts)
        del texts
    across = _duplicates_across(keys, task.files)
    names = list(task.splits)
    errors = list(across)
    del keys

    pairs = near_duplicate_pairs(t for ds in task.splits.values() for t in ds["text"][:])
    near = [(i, j, s) for i, j, s in pairs if row_keys[i] != row_keys[j]]
    starts = np.cumsum([0, *rows.values()])

    def where(i: int) -> str:  # a row of all splits in order, as "split row N"
        split = int(np.searchsorted(starts, i, side="right")) - 1
        return f"{names[split]} row {i - starts[split] + 1}"

    examples = [f"{where(i)} ~ {where(j)} (cosine {s:.2f})" for i, j, s in near[:5]]
    overlap = 0.0
    if "test" in grams and "train" in grams:
        test_hashes, test_rows = grams["test"]
        shared = np.isin(test_hashes, grams["train"][0])
        overlap = np.unique(test_rows[shared]).size / max(1, rows["test"])
    return CheckReport(rows, per_label, words, within, across, len(near), examples, overlap, errors, coverage,
                       target_words)


def _duplicates_across(keys: dict[str, dict[bytes, int]], files: dict) -> list[str]:
    """Each row of a later split whose text (by its exact-duplicate key) is a row of an earlier one."""
    names, found = list(keys), []
    for a_i, a in enumerate(names):
        for b in names[a_i + 1 :]:
            found += [f"{files.get(b, b)}: row {row + 1} duplicates {files.get(a, a)} row {keys[a][key] + 1}"
                      for key, row in keys[b].items() if key in keys[a]]
    return found


def length_stats(lengths: list[int]) -> dict[str, float]:
    """min, p5, median, mean, p95 and max of word counts."""
    import statistics

    q = statistics.quantiles(lengths, n=20) if len(lengths) > 1 else lengths * 19
    return {"min": min(lengths), "p5": q[0], "median": statistics.median(lengths), "p95": q[-1],
            "max": max(lengths), "mean": statistics.fmean(lengths)}


def field_coverage(task: TaskData) -> dict[str, dict[str, float]]:
    """Per schema field and split, the share of rows whose target gives the field a value (not null, not [])."""
    import json

    fields = list((task.schema or {}).get("properties", {}))
    out: dict[str, dict[str, float]] = {name: {} for name in fields}
    for split, ds in task.splits.items():
        targets = [json.loads(t) for t in ds["label"][:]]
        for name in fields:
            given = sum(t.get(name) not in (None, "", [], {}) for t in targets)
            out[name][split] = given / max(1, len(targets))
    return out


def _split_ngrams(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every word 5-gram hash of the texts and the row it comes from, as two int64 arrays."""
    hashes, owners = array("q"), array("q")
    for i, text in enumerate(texts):
        found = _ngram_hashes(text)
        hashes.extend(found)
        owners.extend([i] * len(found))
    return np.frombuffer(hashes, np.int64), np.frombuffer(owners, np.int64)
