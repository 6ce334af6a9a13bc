"""Evaluation of a classifier on a data loader."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from moma_core.metrics import classification_metrics


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int,
             device: str | torch.device = "cpu") -> dict:
    """Mean cross-entropy ``loss``, ``num_examples`` and :func:`classification_metrics`."""
    was_training = model.training
    model.eval().to(device)
    preds, targets, loss_sum = [], [], 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        preds.append(logits.argmax(1).cpu())
        targets.append(y.cpu())
    model.train(was_training)
    p, t = torch.cat(preds), torch.cat(targets)
    out = classification_metrics(p, t, num_classes)
    out["loss"] = loss_sum / len(t)
    out["num_examples"] = len(t)
    return out
