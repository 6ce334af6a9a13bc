"""Splitting one labelled dataset among simulated sites: IID, Dirichlet label skew, by domain."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PARTITIONERS = ("iid", "dirichlet", "domain")


def partition(labels: Sequence[int], num_sites: int, method: str = "iid", alpha: float = 0.5,
              seed: int = 0, domains: Sequence[str] | None = None,
              min_per_site: int = 2) -> list[np.ndarray]:
    """Indices of each site's share.

    ``iid``: a seeded shuffle cut in equal parts. ``dirichlet``: for each class, site shares
    drawn from Dir(α) (small α: strong label skew), redrawn until every site has
    ``min_per_site`` examples. ``domain``: one site per distinct value of ``domains`` (e.g. the
    stain/scanner of each image), so ``num_sites`` must equal the number of domains.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if num_sites < 1:
        raise ValueError("num_sites must be at least 1")
    if method == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_sites)]
    if method == "dirichlet":
        if alpha <= 0:
            raise ValueError("alpha must be positive")
        for _ in range(100):
            parts: list[list[int]] = [[] for _ in range(num_sites)]
            for c in np.unique(labels):
                idx = rng.permutation(np.flatnonzero(labels == c))
                cuts = (np.cumsum(rng.dirichlet([alpha] * num_sites)) * len(idx)).astype(int)
                for site, chunk in enumerate(np.split(idx, cuts[:-1])):
                    parts[site].extend(chunk.tolist())
            if min(len(p) for p in parts) >= min_per_site:
                return [np.sort(np.array(p, dtype=int)) for p in parts]
        raise ValueError(f"could not give every site {min_per_site} examples with α={alpha}")
    if method == "domain":
        if domains is None:
            raise ValueError("the domain partitioner needs a domain per example")
        names = sorted(set(domains))
        if len(names) != num_sites:
            raise ValueError(f"{len(names)} domains ({names[:5]}) for {num_sites} sites")
        d = np.asarray(domains)
        return [np.flatnonzero(d == name) for name in names]
    raise ValueError(f"unknown partitioner {method!r}; choose one of {PARTITIONERS}")
