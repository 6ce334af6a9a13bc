"""Momentum-contrast key queue (MoCo memory) and its NCE logits.

``queue`` holds K past keys (K×D, rows L2-normalised, random-normal at start); ``queue_ptr`` is
the FIFO write position. A batch of keys overwrites rows ptr..ptr+B-1 (mod K).

The queue is only written after the backward pass (:meth:`KeyQueue.enqueue` from the objective's
``after_step``), so the logits read it in place: no copy of the K×D queue per step (the
reference clones it because it enqueues inside the forward pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KeyQueue(nn.Module):
    """FIFO queue of K negatives with temperature τ for the NCE loss."""

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, dim: int, size: int, temperature: float = 0.15) -> None:
        super().__init__()
        self.size = size
        self.temperature = temperature
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NCE logits [q·k, q·Qᵀ]/τ (B×(1+K)) and their labels (all 0: the positive).

        q is divided by τ before the products (B×D values instead of B×(1+K)); the queue must
        not be written before the backward pass of these logits.
        """
        q = q / self.temperature
        pos = (q * k).sum(dim=1, keepdim=True)
        neg = q @ self.queue.t()
        logits = torch.cat([pos, neg], dim=1)
        return logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` at the pointer, wrapping around the end of the queue."""
        n = keys.shape[0]
        ptr = int(self.queue_ptr)
        idx = (torch.arange(n, device=keys.device) + ptr) % self.size
        self.queue.index_copy_(0, idx, keys.detach().to(self.queue.dtype))
        self.queue_ptr[0] = (ptr + n) % self.size
