"""Momentum-contrast key queue (MoCo memory) and its NCE logits.

``queue`` holds K past keys (K×D, rows L2-normalised, random-normal at start); ``queue_ptr`` is
the FIFO write position. A batch of keys overwrites rows ptr..ptr+B-1 (mod K).

The queue is only written after the backward pass (:meth:`KeyQueue.enqueue` from the objective's
``after_step``), so the logits read it in place: no copy of the K×D queue per step (the
reference clones it because it enqueues inside the forward pass).

With ``track_ids`` the queue also remembers which training image each key came from
(``queue_ids``, −1: the random start) and :meth:`KeyQueue.logits` masks, for each query, the
queued keys of its own image: an earlier key of the same image is never one of its negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KeyQueue(nn.Module):
    """FIFO queue of K negatives with temperature τ for the NCE loss."""

    queue: torch.Tensor
    queue_ptr: torch.Tensor
    queue_ids: torch.Tensor

    def __init__(self, dim: int, size: int, temperature: float = 0.15,
                 track_ids: bool = False) -> None:
        super().__init__()
        self.size = size
        self.temperature = temperature
        self.track_ids = track_ids
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if track_ids:
            self.register_buffer("queue_ids", torch.full((size,), -1, dtype=torch.long))

    def logits(self, q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """NCE logits [q·k, q·Qᵀ]/τ (B×(1+K)) and their labels (all 0: the positive).

        q is divided by τ before the products (B×D values instead of B×(1+K)); the queue must
        not be written before the backward pass of these logits. With ``ids`` (the batch's
        image indices, ``track_ids`` queues) a queued key of the query's own image is masked.
        """
        q = q / self.temperature
        pos = (q * k).sum(dim=1, keepdim=True)
        neg = q @ self.queue.t()
        if ids is not None and self.track_ids:
            neg = neg.masked_fill(self.queue_ids[None, :] == ids[:, None], float("-inf"))
        logits = torch.cat([pos, neg], dim=1)
        return logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Write ``keys`` (and, tracking, their images' ``ids``) at the pointer, wrapping
        around the end of the queue."""
        n = keys.shape[0]
        ptr = int(self.queue_ptr)
        if n > self.size:  # a batch larger than the queue: its last K keys, where they land
            keys, ids = keys[-self.size:], (ids[-self.size:] if ids is not None else None)
            ptr, n = (ptr + n - self.size) % self.size, self.size
        idx = (torch.arange(n, device=keys.device) + ptr) % self.size
        self.queue.index_copy_(0, idx, keys.detach().to(self.queue.dtype))
        if self.track_ids:
            new = ids if ids is not None else torch.full((n,), -1, dtype=torch.long)
            self.queue_ids.index_copy_(0, idx, new.to(self.queue_ids.device, torch.long))
        self.queue_ptr[0] = (ptr + n) % self.size
