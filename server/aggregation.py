"""Aggregation of site updates: weighted mean (FedAvg/FedProx), coordinate median, trimmed mean.

Before anything is aggregated each update is checked against the global model: the same tensor
names and shapes, finite values only — less the keys the sites keep to themselves under FedBN
(``local``), which an update must leave out. A failing update is rejected and reported, never
averaged. Aggregation is key-wise: a key no site sent keeps its global value.
"""

from __future__ import annotations

from collections.abc import Collection

import torch


def check_update(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                 local: Collection[str] = ()) -> str | None:
    """Why ``update`` must be rejected, or None when it is acceptable.

    ``local``: keys a site keeps (FedBN's normalisation layers); an update must omit exactly
    those of them the reference has. The reason names only the reference's keys, never a name
    the site chose.
    """
    local = set(local)
    missing = [k for k in reference if k not in update and k not in local]
    extra = [k for k in update if k not in reference]
    if missing or extra:
        return f"tensor names differ (missing {missing[:3]}, {len(extra)} unexpected)"
    sent_local = [k for k in reference if k in update and k in local]
    if sent_local:
        return f"kept-local (FedBN) tensors were sent: {sent_local[:3]}"
    for k in update:
        ref = reference[k]
        if tuple(update[k].shape) != tuple(ref.shape):
            return f"tensor {k} has shape {tuple(update[k].shape)}, {tuple(ref.shape)} expected"
        if not torch.isfinite(update[k]).all():
            return f"tensor {k} contains NaN or Inf"
    return None


def aggregate(updates: list[dict[str, torch.Tensor]], weights: list[float], method: str,
              trim_fraction: float = 0.2, reference: dict[str, torch.Tensor] | None = None
              ) -> dict[str, torch.Tensor]:
    """Combine checked updates key-wise; ``weights`` (examples) apply to the mean methods.

    Each key is combined over the updates that carry it (weights renormalised among them); with
    a ``reference`` (the global model), a key no update carries keeps its global value.
    """
    if not updates:
        raise ValueError("nothing to aggregate")
    if method not in ("fedavg", "fedprox", "median", "trimmed-mean"):
        raise ValueError(f"unknown aggregation {method!r}")
    w_all = torch.tensor(weights, dtype=torch.float64)
    if method in ("fedavg", "fedprox") and float(w_all.sum()) <= 0:
        raise ValueError("aggregation weights must be positive")
    keys = dict.fromkeys([*(reference or {}), *(k for u in updates for k in u)])
    out = {}
    for k in keys:
        have = [i for i, u in enumerate(updates) if k in u]
        if not have:
            out[k] = reference[k].detach().clone()  # type: ignore[index]
            continue
        stack = torch.stack([updates[i][k].to(torch.float64) for i in have])
        n = len(have)
        if method in ("fedavg", "fedprox"):
            w = w_all[have]
            agg = torch.tensordot(w / w.sum(), stack, dims=1) if float(w.sum()) > 0 \
                else stack.mean(dim=0)
        elif method == "median":
            srt = stack.sort(dim=0).values
            agg = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2
        else:
            cut = int(trim_fraction * n)
            agg = stack.sort(dim=0).values[cut:n - cut].mean(dim=0)
        out[k] = agg.to(updates[have[0]][k].dtype)
    return out
