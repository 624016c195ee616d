"""Nested, label-stratified subsets of the train split, for a learning curve: the fine-tune trained at each size
sees the rows it saw at the smaller sizes plus more, in the split's label proportions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def nested_stratified_subsets(labels: Sequence[str], sizes: Sequence[int], seed: int) -> list[list[int]]:
    """For each size (ascending, each <= len(labels)), the sorted row indices of a subset of that many rows.

    Each subset is a prefix of one seeded priority order (`priority_order`), so it contains every smaller one.
    """
    order = priority_order(labels, max(sizes, default=0), seed)
    return [sorted(order[:size]) for size in sizes]


def priority_order(labels: Sequence[str], length: int, seed: int) -> list[int]:
    """The first `length` row indices of an order in which every prefix is stratified by label.

    One row of every label comes first (most frequent label first), so a prefix as long as the number of labels
    already holds each; after that each next row goes to the label furthest below its `floored_quotas` for the
    prefix, ties to the more frequent label. Rows within a label, and the order among labels of equal frequency,
    follow the seed.
    """
    rng = np.random.default_rng(seed)
    codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)[1]
    counts = np.bincount(codes)
    # Most frequent first; a seeded key among equals, so no label is favoured by its name.
    ranked = np.lexsort((rng.permutation(len(counts)), -counts))
    rows = [rng.permutation(np.flatnonzero(codes == label)).tolist() for label in ranked]
    share, available = counts[ranked] / counts.sum(), counts[ranked]
    taken = np.ones(len(ranked), dtype=int)
    order = [label_rows[0] for label_rows in rows]
    for prefix in range(len(order) + 1, length + 1):
        deficit = floored_quotas(share, prefix) - taken
        deficit[taken == available] = -np.inf  # never past a label's rows
        label = int(np.argmax(deficit))  # the first of equals: the more frequent label
        order.append(rows[label][taken[label]])
        taken[label] += 1
    return order[:length]


def floored_quotas(share: np.ndarray, size: int) -> np.ndarray:
    """Each label's ideal (fractional) row count in a subset of `size` >= len(share) rows: proportional to its share
    but at least 1, the labels lifted to 1 taking their extra from the others in proportion to their shares."""
    by_share = np.argsort(-share, kind="stable")
    k = np.arange(1, len(share) + 1)
    # With the k largest labels proportional and the rest at 1, those k share size - (labels - k) rows.
    scale = (size - len(share) + k) / np.cumsum(share[by_share])
    proportional = int(k[scale * share[by_share] >= 1].max())
    quotas = np.ones(len(share))
    chosen = by_share[:proportional]
    quotas[chosen] = scale[proportional - 1] * share[chosen]
    return quotas
