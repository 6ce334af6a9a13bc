"""Partitioners for simulated sites."""

import numpy as np
import pytest

from moma_core.partition import partition

LABELS = np.repeat(np.arange(4), 50)


def _covers_exactly(parts):
    joined = np.concatenate(parts)
    return sorted(joined.tolist()) == list(range(len(LABELS)))


def test_iid_is_a_seeded_even_cover():
    parts = partition(LABELS, 3, "iid", seed=1)
    assert _covers_exactly(parts) and {len(p) for p in parts} <= {66, 67}
    assert all(np.array_equal(a, b) for a, b in
               zip(parts, partition(LABELS, 3, "iid", seed=1), strict=True))


def test_dirichlet_small_alpha_skews_labels():
    skewed = partition(LABELS, 4, "dirichlet", alpha=0.1, seed=0)
    even = partition(LABELS, 4, "dirichlet", alpha=100.0, seed=0)
    assert _covers_exactly(skewed) and _covers_exactly(even)

    def max_share(parts):
        return np.mean([np.bincount(LABELS[p], minlength=4).max() / len(p) for p in parts])

    assert max_share(skewed) > max_share(even) + 0.2


def test_domain_partition_and_errors():
    domains = ["a", "b"] * 100
    parts = partition(LABELS, 2, "domain", domains=domains)
    assert all(len(set(np.asarray(domains)[p])) == 1 for p in parts)
    with pytest.raises(ValueError, match="2 domains"):
        partition(LABELS, 3, "domain", domains=domains)
    with pytest.raises(ValueError, match="unknown partitioner"):
        partition(LABELS, 2, "random")
