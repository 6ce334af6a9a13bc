"""Evaluation of a classifier on a data loader, and matching a model's classes to the data's."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from moma_core.metrics import classification_metrics


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int,
             device: str | torch.device = "cpu",
             target_map: Sequence[int] | None = None) -> dict:
    """Mean cross-entropy ``loss``, ``num_examples`` and :func:`classification_metrics`.

    ``target_map[j]`` is the model's output index of the data's label ``j`` (see
    :func:`class_index_map`); without it the labels are taken as the model's indices.
    """
    was_training = model.training
    model.eval().to(device)
    remap = None if target_map is None else torch.as_tensor(list(target_map), dtype=torch.long)
    preds, targets, loss_sum = [], [], 0.0
    for x, y in loader:
        if remap is not None:
            y = remap[torch.as_tensor(y, dtype=torch.long)]
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        preds.append(logits.argmax(1).cpu())
        targets.append(y.cpu())
    model.train(was_training)
    if not targets:
        raise ValueError("nothing to evaluate: the data set is empty")
    p, t = torch.cat(preds), torch.cat(targets)
    out = classification_metrics(p, t, num_classes)
    out["loss"] = loss_sum / len(t)
    out["num_examples"] = len(t)
    return out


def class_index_map(model_classes: Sequence[str], data_classes: Sequence[str]) -> list[int]:
    """For each of the data's class names (in its label order), the model's output index.

    Classes are matched by name, never by position: the same names in another order are
    remapped; a name on one side only is a :class:`ValueError` listing both lists.
    """
    model_names, data_names = [str(c) for c in model_classes], [str(c) for c in data_classes]
    for side, names in (("checkpoint", model_names), ("data", data_names)):
        if len(set(names)) != len(names):
            raise ValueError(f"the {side}'s class names repeat a name: {names}")
    if set(model_names) != set(data_names):
        missing = [c for c in model_names if c not in data_names]
        extra = [c for c in data_names if c not in model_names]
        raise ValueError(
            f"the data's classes {data_names} are not the checkpoint's {model_names} "
            f"(missing from the data: {missing or 'none'}; not in the checkpoint: "
            f"{extra or 'none'})")
    return [model_names.index(c) for c in data_names]


def metrics_line(split: str, metrics: dict) -> str:
    """One line naming the split: ``test accuracy 0.812 macro-F1 0.790 kappa 0.850 (n=400)``."""
    return (f"{split} accuracy {metrics['accuracy']:.3f} macro-F1 {metrics['macro_f1']:.3f} "
            f"kappa {metrics['kappa']:.3f} (n={metrics['num_examples']})")
