"""Projection heads g_s / g_t of MoMA: pooled feature -> L2-normalised 512-d embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class L2Normalize(nn.Module):
    """Row-wise L2 normalisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=1)


def projection_head(in_dim: int, out_dim: int = 512, kind: str = "mlp") -> nn.Sequential:
    """Reference heads: ``mlp`` Linear(d,d)-ReLU-Linear(d,out)-L2, ``linear`` Linear-L2,
    ``none`` L2 only.

    With ``none`` the embedding dimension is ``in_dim`` (no projection).
    """
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim),
            L2Normalize(),
        )
    if kind == "linear":
        return nn.Sequential(nn.Linear(in_dim, out_dim), L2Normalize())
    if kind == "none":
        return nn.Sequential(L2Normalize())
    raise ValueError(f"unknown projection head {kind!r}; choose mlp, linear or none")
