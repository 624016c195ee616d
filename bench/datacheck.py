"""`roi data check` at scale: wall time and peak memory on a synthetic 100,000-row task.

The task is built from the shipped support tickets: each row is one or more shipped texts (16
words at least) with about half the words swapped for words drawn from the shipped texts, so
rows read like tickets but are not near copies of each other. Known problems are planted:
exact duplicates within train (case and punctuation changed), test rows that repeat train
rows, and near duplicates (a long row repeated with one word added). `roi data check` runs in
a fresh subprocess `--repeats` times; the median wall time and peak RSS are printed.

    python bench/datacheck.py [--rows 100000] [--repeats 3] [--old-rows 20000]

--old-rows also times the brute-force near-duplicate search this replaced (TF-IDF self-product
in blocks) against the new one, in this process, on the first N rows; 0 skips it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "datasets" / "support_tickets"

_PUNCT = re.compile(r"[^\w\s]")


@dataclass
class Planted:
    """What `build_task` planted, as `roi data check` reports it."""

    rows: dict[str, int]
    exact_within: dict[str, int]
    exact_across: int
    near: list[tuple[str, int, str, int]]  # (split, row, split, row), rows 1-based as printed


def _shipped_rows() -> list[dict]:
    return [json.loads(line) for name in ("train", "validation", "test")
            for line in (SHIPPED / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def _key(text: str) -> str:
    """`pipeline.task.checks.normalise`, repeated so the builder stands alone."""
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()


def build_task(folder: Path, rows: int = 100_000, seed: int = 0, test_share: float = 0.2,
               exact: int = 40, across: int = 20, near: int = 40) -> Planted:
    """Write train.jsonl, test.jsonl and labels.json for a task of `rows` rows into `folder`.

    Every generated row is unique after normalising; then `exact` train rows are repeated in train
    (upper case, an added "!"), `across` train rows are repeated in test, and `near` rows of 25+
    words are repeated in train with one word added (TF-IDF cosine about 0.95). The planted rows
    are part of the `rows` total.
    """
    rng = random.Random(seed)
    shipped = _shipped_rows()
    words = [w for r in shipped for w in _PUNCT.sub("", r["text"]).split()]
    n_test = int(rows * test_share)
    n_train = rows - n_test
    made = n_train - exact - near, n_test - across
    seen: set[str] = set()

    def fresh() -> dict:
        while True:
            # 16 words at least: two rows made from the same short ticket could differ in one word only
            picks = [rng.choice(shipped)]
            while sum(len(r["text"].split()) for r in picks) < 16:
                picks.append(rng.choice(shipped))
            text = " ".join(w if rng.random() < 0.5 else rng.choice(words)
                            for r in picks for w in r["text"].split())
            if (key := _key(text)) and key not in seen:
                seen.add(key)
                return {"text": text, "label": picks[0]["label"]}

    train = [fresh() for _ in range(made[0])]
    test = [fresh() for _ in range(made[1])]
    # Distinct sources: a row copied twice would add pairs between its copies.
    long_rows = [i for i, r in enumerate(train) if len(r["text"].split()) >= 25]
    near_sources = rng.sample(long_rows, near)
    sources = rng.sample(sorted(set(range(len(train))) - set(near_sources)), exact + across)
    for i in sources[:exact]:
        train.append({"text": train[i]["text"].upper() + "!", "label": train[i]["label"]})
    near_pairs = []
    for i in near_sources:
        extra = rng.choice([w for w in words if len(w) > 3 and _key(w) not in _key(train[i]["text"]).split()])
        train.append({"text": f"{train[i]['text']} {extra}", "label": train[i]["label"]})
        near_pairs.append(("train", i + 1, "train", len(train)))
    for i in sources[exact:]:
        test.append({"text": train[i]["text"], "label": train[i]["label"]})
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("test", test)):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in split)
    (folder / "labels.json").write_text((SHIPPED / "labels.json").read_text())
    return Planted({"train": len(train), "test": len(test)}, {"train": exact, "test": 0}, across, near_pairs)


@dataclass
class CheckRun:
    code: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str


def run_check(folder: Path) -> CheckRun:
    """`roi data check FOLDER` in a fresh Python, timed, with its peak RSS."""
    # A wrapper process of its own, so RUSAGE_CHILDREN holds the check and nothing else.
    script = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
              "p = subprocess.run([sys.executable, '-m', 'pipeline.cli', 'data', 'check', sys.argv[1]], "
              "capture_output=True, text=True); wall = time.perf_counter() - t; "
              "print(json.dumps([p.returncode, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
              "p.stdout, p.stderr]))")
    out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    code, wall, rss_kb, stdout, stderr = json.loads(out.stdout)
    return CheckRun(code, wall, rss_kb / 1024, stdout, stderr)  # ru_maxrss is in KB on Linux


def _old_near_duplicate_pairs(texts: list[str], threshold: float = 0.9) -> list[tuple[int, int, float]]:
    """The brute-force search `roi data check` used before: the TF-IDF self-product, 2,000 rows at a time."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    matrix = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True).fit_transform(texts)
    pairs = []
    for start in range(0, matrix.shape[0], 2000):
        block = (matrix[start : start + 2000] @ matrix.T).tocoo()
        for i, j, sim in zip(block.row, block.col, block.data):
            i = int(i) + start
            if i < j and sim >= threshold:
                pairs.append((i, int(j), float(sim)))
    return sorted(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-rows", type=int, default=0, help="also time the old brute-force search on N rows")
    parser.add_argument("--folder", default="/tmp/roi_datacheck_bench")
    args = parser.parse_args()

    folder = Path(args.folder)
    planted = build_task(folder, args.rows)
    print(f"{sum(planted.rows.values()):,} rows in {folder}: {planted.rows}; planted {sum(planted.exact_within.values())} "
          f"exact duplicates within, {planted.exact_across} across, {len(planted.near)} near")
    runs = []
    for _ in range(args.repeats):
        runs.append(run := run_check(folder))
        print(f"  run: {run.wall_s:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB, exit code {run.code}")
    walls, rss = [r.wall_s for r in runs], [r.peak_rss_mb for r in runs]
    print("\n".join(line for line in run.stdout.splitlines() if "duplicates" in line or "5-gram" in line))
    print(f"roi data check, {sum(planted.rows.values()):,} rows: median {statistics.median(walls):.1f} s wall, "
          f"peak RSS {statistics.median(rss):.0f} MB (median of {args.repeats})")
    if args.old_rows:
        sys.path.insert(0, str(ROOT))
        from pipeline.task.checks import near_duplicate_pairs

        texts = [json.loads(line)["text"] for line in (folder / "train.jsonl").read_text().splitlines()][: args.old_rows]
        t = time.perf_counter()
        old = _old_near_duplicate_pairs(texts)
        old_s = time.perf_counter() - t
        t = time.perf_counter()
        new = near_duplicate_pairs(texts)
        new_s = time.perf_counter() - t
        print(f"near-duplicate search on {len(texts):,} rows: brute force {old_s:.1f} s, MinHash LSH {new_s:.1f} s "
              f"({old_s / new_s:.0f}x); same pairs: {[p[:2] for p in old] == [p[:2] for p in new]}")


if __name__ == "__main__":
    main()
