"""Classification metrics (torchmetrics): accuracy, macro-F1, quadratic kappa, recall, confusion."""

from __future__ import annotations

import torch


def classification_metrics(preds: torch.Tensor, targets: torch.Tensor, num_classes: int
                           ) -> dict:
    """Metrics of integer predictions against targets.

    Returns accuracy (micro), macro_f1, kappa (Cohen, quadratic weights), per_class_recall (list)
    and confusion (rows: true class, columns: predicted).
    """
    from torchmetrics.functional.classification import (  # ~3 s to import: only when scoring
        multiclass_accuracy,
        multiclass_cohen_kappa,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_recall,
    )

    preds = preds.long().cpu()
    targets = targets.long().cpu()
    if preds.shape != targets.shape or preds.numel() == 0:
        raise ValueError("predictions and targets must be non-empty and of the same shape")
    kappa = multiclass_cohen_kappa(preds, targets, num_classes, weights="quadratic")
    return {
        "accuracy": float(multiclass_accuracy(preds, targets, num_classes, average="micro")),
        "macro_f1": float(multiclass_f1_score(preds, targets, num_classes, average="macro")),
        "kappa": 0.0 if torch.isnan(kappa) else float(kappa),
        "per_class_recall": multiclass_recall(preds, targets, num_classes, average=None).tolist(),
        "confusion": multiclass_confusion_matrix(preds, targets, num_classes).tolist(),
    }
