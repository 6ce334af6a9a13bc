"""Aggregation of site updates: weighted mean (FedAvg/FedProx), coordinate median, trimmed mean.

Before anything is aggregated each update is checked against the global model: the same tensor
names and shapes, finite values only. A failing update is rejected and reported, never averaged.
"""

from __future__ import annotations

import torch


def check_update(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
                 ) -> str | None:
    """Why ``update`` must be rejected, or None when it is acceptable."""
    missing = [k for k in reference if k not in update]
    extra = [k for k in update if k not in reference]
    if missing or extra:
        return f"tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for k, ref in reference.items():
        if tuple(update[k].shape) != tuple(ref.shape):
            return f"tensor {k} has shape {tuple(update[k].shape)}, {tuple(ref.shape)} expected"
        if not torch.isfinite(update[k]).all():
            return f"tensor {k} contains NaN or Inf"
    return None


def aggregate(updates: list[dict[str, torch.Tensor]], weights: list[float], method: str,
              trim_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """Combine checked updates; ``weights`` (examples) apply to the mean methods."""
    if not updates:
        raise ValueError("nothing to aggregate")
    out = {}
    w = torch.tensor(weights, dtype=torch.float64)
    if method in ("fedavg", "fedprox"):
        if float(w.sum()) <= 0:
            raise ValueError("aggregation weights must be positive")
        w = w / w.sum()
    for k in updates[0]:
        stack = torch.stack([u[k].to(torch.float64) for u in updates])
        if method in ("fedavg", "fedprox"):
            agg = torch.tensordot(w, stack, dims=1)
        elif method == "median":
            srt, n = stack.sort(dim=0).values, len(updates)
            agg = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2
        elif method == "trimmed-mean":
            cut = int(trim_fraction * len(updates))
            srt = stack.sort(dim=0).values
            agg = srt[cut:len(updates) - cut].mean(dim=0)
        else:
            raise ValueError(f"unknown aggregation {method!r}")
        out[k] = agg.to(updates[0][k].dtype)
    return out
