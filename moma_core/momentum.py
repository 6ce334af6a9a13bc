"""Momentum (EMA) update of a key network from a query network: θ_k ← m·θ_k + (1−m)·θ_q.

Parameters only, as in MoCo and the MoMA reference; buffers (BatchNorm statistics) are untouched.
"""

from __future__ import annotations

import torch
from torch import nn


def paired_parameters(key_net: nn.Module, query_net: nn.Module
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters of the two networks paired by name where the shapes agree.

    A classifier head of a different class count (teacher of another task) is left out, so the
    backbones still follow each other. Raises when nothing pairs (different architectures).
    """
    query = dict(query_net.named_parameters())
    keys, queries = [], []
    for name, p in key_net.named_parameters():
        q = query.get(name)
        if q is not None and q.shape == p.shape:
            keys.append(p)
            queries.append(q)
    if not keys:
        raise ValueError("momentum update needs identical architectures: no parameter pairs")
    return keys, queries


@torch.no_grad()
def momentum_update(key_params: list[torch.Tensor], query_params: list[torch.Tensor],
                    m: float) -> None:
    """In place on ``key_params``: θ_k ← m·θ_k + (1−m)·θ_q."""
    torch._foreach_mul_(key_params, m)
    torch._foreach_add_(key_params, query_params, alpha=1.0 - m)


def momentum_update_modules(key_net: nn.Module, query_net: nn.Module, m: float) -> None:
    """Momentum update of every paired parameter of ``key_net`` from ``query_net``."""
    momentum_update(*paired_parameters(key_net, query_net), m)
