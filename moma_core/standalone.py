"""Standalone (one site, no federation) training with per-epoch validation.

Shared by ``moma-teacher`` (CE on the source task) and ``moma-distill`` (a student distilled on
one site, the reference paper's setting). Both call the one loop, :func:`train_local`.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset

from moma_core.evaluate import evaluate
from moma_core.objectives import Objective
from moma_core.progress import console, progress_bar
from moma_core.sources import SiteData, make_loader
from moma_core.train import TrainConfig, TrainResult, train_local


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is present, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return device


def fit(model: nn.Module, objective: Objective, data: SiteData, cfg: TrainConfig,
        batch_size: int, device: str, label: str, test: Dataset | None = None
        ) -> tuple[TrainResult, list[dict]]:
    """Train ``cfg.epochs`` epochs; returns the result and one history row per epoch."""
    seed = cfg.seed or 0
    train_loader = make_loader(data.train, batch_size, train=True, seed=seed, device=device)
    val_loader = make_loader(data.val, batch_size * 2, train=False, device=device)
    n_cls = len(data.classes)
    rows: list[dict] = []
    start = time.time()

    def on_epoch_end(epoch: int, losses: dict[str, float]) -> None:
        val = evaluate(model, val_loader, n_cls, device)
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in losses.items()},
               "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "val_macro_f1": val["macro_f1"], "val_kappa": val["kappa"],
               "elapsed_s": time.time() - start}
        rows.append(row)
        console.print(f"[{label}] epoch {epoch + 1}/{cfg.epochs} loss {losses['loss']:.3f} "
                      f"val acc {val['accuracy']:.3f} F1 {val['macro_f1']:.3f} "
                      f"kappa {val['kappa']:.3f}")

    with progress_bar(label) as progress:
        result = train_local(model, objective, train_loader, cfg, device, progress=progress,
                             on_epoch_end=on_epoch_end)
    if test is not None:
        rows[-1]["test"] = evaluate(model, make_loader(test, batch_size * 2, train=False),
                                    n_cls, device)
    return result, rows
