"""`roi data check` at scale: the MinHash LSH near-duplicate search finds exactly the pairs of the
brute-force TF-IDF cosine it replaced, and 100,000 rows check in seconds within 1 GB."""

from __future__ import annotations

import importlib.util
import random
import re
import sys

import pytest

from conftest import ROOT
from pipeline.task.checks import near_duplicate_pairs, normalise
from pipeline.task.splits import load_task, task_config_for_folder

SHIPPED = ROOT / "datasets" / "support_tickets"
BANKING = ROOT.parent / "shared" / "datasets" / "banking77"


def _brute_force(texts: list[str], threshold: float = 0.9) -> list[tuple[int, int, float]]:
    """The definition: TF-IDF (words and bigrams, sublinear tf) cosine of every pair, from the full self-product."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    matrix = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True).fit_transform(texts)
    sims = (matrix @ matrix.T).tocoo()
    return sorted((int(i), int(j), float(s)) for i, j, s in zip(sims.row, sims.col, sims.data) if i < j and s >= threshold)


def _assert_same_pairs(found, expected):
    assert [p[:2] for p in found] == [p[:2] for p in expected]
    assert all(abs(a[2] - b[2]) < 1e-12 for a, b in zip(found, expected))  # the same products, summed in another order


def _texts(folder) -> list[str]:
    task = load_task(task_config_for_folder(folder))
    return [t for ds in task.splits.values() for t in ds["text"][:]]


def _with_planted_variants(texts: list[str], seed: int = 0) -> list[str]:
    """The texts plus edited copies of some: a word added, replaced, swapped or dropped, or only case changed.

    Long texts stay above the 0.9 cosine after one edit, short ones fall below it: the planted pairs straddle it.
    """
    rng = random.Random(seed)
    edits = [
        lambda w: w + ["please"],
        lambda w: w[: len(w) // 2] + ["invoice"] + w[len(w) // 2 + 1 :],
        lambda w: w[:1] + w[2:3] + w[1:2] + w[3:],
        lambda w: w[:-1],
        lambda w: [x.upper() for x in w] + ["!!"],
    ]
    out = list(texts)
    for i in rng.sample(range(len(texts)), 80):
        out.append(" ".join(edits[i % len(edits)](texts[i].split())))
    return out


def test_near_duplicates_are_exactly_the_brute_force_pairs_on_the_shipped_set_with_planted_ones():
    texts = _with_planted_variants(_texts(SHIPPED))
    expected = _brute_force(texts)
    _assert_same_pairs(near_duplicate_pairs(texts), expected)
    not_exact = [s for i, j, s in expected if normalise(texts[i]) != normalise(texts[j])]
    assert len(not_exact) >= 20 and min(not_exact) < 0.92  # real near duplicates, some close to the threshold
    below = [s for i, j, s in _brute_force(texts, 0.8) if s < 0.9 and j >= 1520]
    assert below  # and planted pairs just under it, which must not be reported


def test_near_duplicates_edge_cases():
    assert near_duplicate_pairs([]) == [] and near_duplicate_pairs(["one text"]) == []
    # A text without a term of two letters has a zero TF-IDF row: similar to nothing, not even its twin.
    assert near_duplicate_pairs(["ok fine then", "!", "ok fine then", "!"]) == [(0, 2, pytest.approx(1.0))]
    texts = ["the card was declined twice today", "the card was declined twice today", "my card was declined"]
    assert near_duplicate_pairs(iter(texts)) == near_duplicate_pairs(texts) == [(0, 1, pytest.approx(1.0))]


@pytest.mark.slow
@pytest.mark.skipif(not BANKING.is_dir(), reason="shared BANKING77 copy not present")
def test_near_duplicates_are_exactly_the_brute_force_pairs_on_banking77():
    texts = _texts(BANKING)
    expected = _brute_force(texts)
    assert len(expected) == 322
    _assert_same_pairs(near_duplicate_pairs(texts), expected)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_datacheck", ROOT / "bench" / "datacheck.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.scale
def test_data_check_on_100k_rows_is_fast_lean_and_finds_what_was_planted(tmp_path):
    bench = _bench()
    folder = tmp_path / "big"
    planted = bench.build_task(folder, rows=100_000)
    run = bench.run_check(folder)
    # bench/datacheck.py reports the real figure (README); a loaded CI machine gets twice the target's 30 s.
    assert run.peak_rss_mb <= 1024, f"peak RSS {run.peak_rss_mb:.0f} MB"
    assert run.wall_s <= 60, f"{run.wall_s:.1f} s"
    assert "train 80000, test 20000 rows" in run.stdout
    assert "exact duplicates within splits: train 40, test 0" in run.stdout
    assert f"exact duplicates across splits: {planted.exact_across}" in run.stdout
    # The all-pairs search on this set (seed 0; 6 minutes, run once) finds the 40 planted pairs and no other.
    assert f"near duplicates (TF-IDF cosine >= 0.9, not exact): {len(planted.near)}" in run.stdout
    shown = re.findall(r"(\w+) row (\d+) ~ (\w+) row (\d+) \(cosine", run.stdout)
    assert len(shown) == 5 and all((a, int(i), b, int(j)) in planted.near for a, i, b, j in shown)
    # The test rows that repeat train rows make it fail, with one line.
    assert run.code == 1 and run.stderr.count("\n") == 1
    assert re.match(r"roi: error: .*test\.jsonl: row \d+ duplicates .*train\.jsonl row \d+ \(\+19 more\)", run.stderr)
