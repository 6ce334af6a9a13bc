"""Standalone (one site, no federation) training with per-epoch validation.

Shared by ``moma-teacher`` (CE on the source task) and ``moma-distill`` (a student distilled on
one site, the reference paper's setting). Both call the one loop, :func:`train_local`. Every
metric printed names its split: ``val`` each epoch, ``test`` once at the end when the data has a
test split (:func:`open_test_split`).
"""

from __future__ import annotations

import argparse
import csv
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from moma_core.data.datasets import DataError, load_dataset
from moma_core.data.transforms import build_transform
from moma_core.errors import DeviceUnavailable
from moma_core.evaluate import evaluate, metrics_line
from moma_core.objectives import Objective, training_set
from moma_core.progress import console, progress_bar
from moma_core.sources import SYNTHETIC, SiteData, Transformed, make_loader, open_eval_data
from moma_core.train import TrainConfig, TrainResult, train_local

#: console.print options for metric lines: ``[label]`` is text, not rich markup, and a line is
#: never wrapped (so that it can be searched for in a log).
PLAIN = {"markup": False, "soft_wrap": True}


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is present, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {device!r} requested but CUDA is not available")
    return device


def fit(model: nn.Module, objective: Objective, data: SiteData, cfg: TrainConfig,
        batch_size: int, device: str, label: str, test: Dataset | None = None
        ) -> tuple[TrainResult, list[dict]]:
    """Train ``cfg.epochs`` epochs; returns the result and one history row per epoch."""
    seed = cfg.seed or 0
    train_loader = make_loader(training_set(objective, data.train), batch_size, train=True,
                               seed=seed, device=device)
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
        console.print(f"[{label}] epoch {epoch + 1}/{cfg.epochs} train loss "
                      f"{losses['loss']:.3f} | {metrics_line('val', val)}", **PLAIN)

    with progress_bar(label) as progress:
        result = train_local(model, objective, train_loader, cfg, device, progress=progress,
                             on_epoch_end=on_epoch_end)
    if test is not None:
        rows[-1]["test"] = evaluate(model, make_loader(test, batch_size * 2, train=False,
                                                       device=device), n_cls, device)
        console.print(f"[{label}] {metrics_line('test', rows[-1]['test'])}", **PLAIN)
    return result, rows


def final_scores(last: dict) -> str:
    """``val accuracy …`` and, when scored, ``test accuracy … (n=…)``."""
    line = f"val accuracy {last['val_accuracy']:.3f}"
    if last.get("test"):
        line += f", test accuracy {last['test']['accuracy']:.3f} " \
                f"(n={last['test']['num_examples']})"
    return line


def has_test_split(source: str) -> bool:
    """Whether ``source`` has a held-out ``test`` split.

    Synthetic data always has one (fresh images); a path has one when it holds a ``test``
    folder beside ``train``, CSV rows whose ``split`` is ``test`` or NPZ ``test_images``.
    """
    if source.startswith(SYNTHETIC):
        return True
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        return (path / "test").is_dir() and (path / "train").is_dir()
    if suffix == ".csv" and path.is_file():
        with path.open(newline="", encoding="utf-8-sig") as f:
            return any((row.get("split") or "").strip() == "test" for row in csv.DictReader(f))
    if suffix == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return "test_images" in z.files
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read npz file {path}: {exc}") from exc
    return False


def test_split_for(args: argparse.Namespace, classes: Sequence[str]) -> Dataset | None:
    """:func:`open_test_split` from a standalone command's data options (``--test-n`` checked)."""
    if args.test_n < 0:
        raise ValueError(f"--test-n {args.test_n}: give 0 (no test split) or more images")
    return open_test_split(args.source, args.image_size, args.seed, args.test_n,
                           args.site_index, args.num_sites, classes,
                           "skip" if args.skip_bad_images else "raise",
                           args.allow_outside_paths)


def open_test_split(source: str, image_size: int, seed: int = 0, n: int = 400,
                    site_index: int | None = None, num_sites: int = 1,
                    classes: Sequence[str] | None = None, on_error: str = "raise",
                    allow_outside_paths: bool = False) -> Dataset | None:
    """The ``test`` split of ``source`` with evaluation preprocessing, or None without one.

    Synthetic: ``n`` held-out images as :func:`~moma_core.sources.open_eval_data` draws them
    (none when ``n`` is 0). A path: its ``test`` split, labelled by ``classes`` when given (pass
    the training data's classes so that labels mean the same).
    """
    if not has_test_split(source):
        return None
    if source.startswith(SYNTHETIC):
        return open_eval_data(source, image_size, seed, n, site_index, num_sites) if n else None
    ds = load_dataset(Path(source), split="test", on_error=on_error, classes=classes,
                      allow_outside=allow_outside_paths)
    return Transformed(ds, range(len(ds)), build_transform(image_size, train=False))
