"""Nested, label-stratified subsets of the train split, for a learning curve: the fine-tune trained on 100, 300,
1000 rows... must see the same rows it saw at the smaller sizes plus more, in the split's label proportions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def nested_stratified_subsets(labels: Sequence[str], sizes: Sequence[int], seed: int) -> list[list[int]]:
    """For each size (ascending, each <= len(labels)), the sorted row indices of a subset of that many rows.

    Each subset is a prefix of one seeded priority order (`priority_order`), so it contains every smaller one.
    """
    order = priority_order(labels, seed)
    return [sorted(order[:size]) for size in sizes]


def priority_order(labels: Sequence[str], seed: int) -> list[int]:
    """Every row index once, ordered so that each prefix is stratified by label.

    One row of every label comes first (most frequent label first), so a prefix as long as the number of labels
    already holds each; after that each next row goes to the label furthest below its share of the prefix
    (prefix length x the label's share of the split), ties to the more frequent label. Rows within a label, and
    the order among labels of equal frequency, follow the seed.
    """
    rng = np.random.default_rng(seed)
    names, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    counts = np.bincount(codes, minlength=len(names))
    # Most frequent first; a seeded key among equals, so no label is favoured by its name.
    ranked = np.lexsort((rng.permutation(len(names)), -counts))
    rows = [rng.permutation(np.flatnonzero(codes == label)).tolist() for label in ranked]
    share = counts[ranked] / counts.sum()
    taken = np.ones(len(ranked), dtype=int)
    order = [label_rows[0] for label_rows in rows]
    for length in range(len(order) + 1, len(codes) + 1):
        deficit = floored_quotas(share, length) - taken
        deficit[taken == counts[ranked]] = -np.inf
        label = int(np.argmax(deficit))
        order.append(rows[label][taken[label]])
        taken[label] += 1
    return order


def floored_quotas(share: np.ndarray, size: int) -> np.ndarray:
    """Each label's ideal (fractional) row count in a subset of `size` >= len(share) rows: proportional to its share,
    but at least 1; the labels lifted to 1 take their extra from the others in proportion to their shares."""
    by_share = np.argsort(-share, kind="stable")
    top = np.cumsum(share[by_share])
    # With the k largest labels proportional and the rest at 1, the k largest share size - (labels - k) rows.
    k = np.arange(1, len(share) + 1)
    scale = (size - len(share) + k) / top
    proportional = k[scale * share[by_share] >= 1].max()
    quotas = np.ones(len(share))
    chosen = by_share[:proportional]
    quotas[chosen] = scale[proportional - 1] * share[chosen]
    return quotas
