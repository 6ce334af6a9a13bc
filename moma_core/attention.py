"""Batch-token multi-head attention of MoMA.

The samples of the mini-batch are the tokens: an embedding batch (B, D) is attended as one
sequence (1, B, D), so each head has a B×B attention matrix. As in the reference: qkv with bias,
output projection, no residual, no normalisation, no dropout.

Untrained and fed MoMA's L2-normalised embeddings (norm 1), its attention logits are close to 0
and its weights 1/B to within 1 %: every sample of the batch gets the batch's mean (see
``moma_core.objectives.MoMA``, "the batch attention averages the batch").
"""

from __future__ import annotations

import torch
from torch import nn


class BatchTokenAttention(nn.Module):
    """Multi-head self-attention across the samples of a batch (dim 512, 4 heads by default)."""

    def __init__(self, dim: int = 512, num_heads: int = 4, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def attention_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights (heads, B, B) of an embedding batch ``x`` (B, D)."""
        q, k, _ = self._qkv(x)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (H, B, B)
        out = (attn @ v).transpose(0, 1).reshape(x.shape[0], -1)  # (B, D)
        return self.proj(out)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, d = x.shape
        qkv = self.qkv(x).reshape(b, 3, self.num_heads, d // self.num_heads).permute(1, 2, 0, 3)
        return qkv[0], qkv[1], qkv[2]  # each (H, B, D/H)
