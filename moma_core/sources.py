"""Where a run's images come from: the embedded synthetic generator or a user's dataset.

A *source* string is either ``synthetic:<task>`` (``source`` or ``target``; the site index picks
the simulated hospital's stain/scanner style) or a path to an ImageFolder directory, a CSV
manifest or an NPZ file. :func:`open_site_data` turns it into train/val datasets with the right
transforms: training augmentation for train, deterministic preprocessing for val.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moma_core.data.datasets import (
    ArrayImageDataset,
    DataError,
    class_counts,
    load_dataset,
    split_indices,
)
from moma_core.data.synthetic import TASKS, SiteStyle, generate, site_styles
from moma_core.data.transforms import build_transform
from moma_core.method_config import SYNTHETIC_N

SYNTHETIC = "synthetic:"


class Transformed(Dataset):
    """``base[indices]`` with ``transform`` applied to each image."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable) -> None:
        self.base, self.indices, self.transform = base, list(indices), transform
        targets = getattr(base, "targets", None)
        self.targets = [int(targets[i]) for i in self.indices] if targets is not None else None
        self.classes = list(base.classes)
        pids = getattr(base, "patient_ids", None)
        #: the patient of each example (CSV manifests with a ``patient_id`` column), else None
        self.patient_ids = [pids[i] for i in self.indices] if pids is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.base[self.indices[i]]
        return self.transform(image), label


@dataclass
class SiteData:
    """A site's datasets and class names."""

    train: Dataset
    val: Dataset
    classes: list[str]

    def counts(self) -> dict[str, dict[str, int]]:
        return {"train": class_counts(self.train), "val": class_counts(self.val)}


def synthetic_style(site_index: int | None, num_sites: int, seed: int = 0) -> SiteStyle:
    """The stain/scanner style of simulated site ``site_index`` (identity when None)."""
    if site_index is None:
        return SiteStyle.identity()
    if not 0 <= site_index < num_sites:
        raise ValueError(f"site index {site_index} outside 0..{num_sites - 1}")
    return site_styles(num_sites, seed=seed)[site_index]


def open_site_data(source: str, image_size: int = 64, augment: str = "randaugment",
                   stain_jitter: float = 0.0, seed: int = 0, n: int = SYNTHETIC_N,
                   site_index: int | None = None, num_sites: int = 1,
                   class_probs: Sequence[float] | None = None, val_fraction: float = 0.25,
                   on_error: str = "raise", classes: Sequence[str] | None = None,
                   allow_outside_paths: bool = False) -> SiteData:
    """Train/val datasets of a source (see module docstring).

    Synthetic: ``n`` training and ``n·val_fraction`` validation images drawn with the site's
    style (and label skew ``class_probs``). A path: its ``train``/``val`` splits when it has them
    (sub-folders, NPZ keys or a CSV ``split`` column), else a stratified split of
    ``val_fraction`` for validation (seeded).
    """
    train_tf = build_transform(image_size, train=True, augment=augment, stain_jitter=stain_jitter)
    eval_tf = build_transform(image_size, train=False)
    if source.startswith(SYNTHETIC):
        task = source[len(SYNTHETIC):]
        if task not in TASKS:
            raise DataError(f"unknown synthetic task {task!r}; choose one of {sorted(TASKS)}")
        style = synthetic_style(site_index, num_sites, seed)
        base_seed = 1000 * seed + 17 * (site_index or 0)
        train = _synthetic(task, n, base_seed + 1, image_size, style, class_probs)
        val = _synthetic(task, max(int(n * val_fraction), len(TASKS[task])), base_seed + 2,
                         image_size, style, class_probs)
        return SiteData(Transformed(train, range(len(train)), train_tf),
                        Transformed(val, range(len(val)), eval_tf), list(train.classes))
    path = Path(source)
    if not path.exists():
        raise DataError(f"data source {source!r}: no such file or directory "
                        "(or use synthetic:source / synthetic:target)")
    base = load_dataset(path, split="train", on_error=on_error, classes=classes,
                        allow_outside=allow_outside_paths)
    val_base = _optional_split(path, "val", on_error, list(base.classes), allow_outside_paths)
    if val_base is not None:
        return SiteData(Transformed(base, range(len(base)), train_tf),
                        Transformed(val_base, range(len(val_base)), eval_tf), list(base.classes))
    tr_idx, va_idx = split_indices(len(base), (1 - val_fraction, val_fraction), seed=seed,
                                   labels=np.asarray(base.targets))
    return SiteData(Transformed(base, tr_idx, train_tf), Transformed(base, va_idx, eval_tf),
                    list(base.classes))


def open_eval_data(source: str, image_size: int = 64, seed: int = 0, n: int = 400,
                   site_index: int | None = None, num_sites: int = 1, split: str = "test",
                   classes: Sequence[str] | None = None) -> Dataset:
    """A held-out evaluation set (synthetic: fresh images; a path: its ``split``)."""
    eval_tf = build_transform(image_size, train=False)
    if source.startswith(SYNTHETIC):
        task = source[len(SYNTHETIC):]
        style = synthetic_style(site_index, num_sites, seed)
        ds = _synthetic(task, n, 1000 * seed + 17 * (site_index or 0) + 3, image_size, style,
                        None)
        return Transformed(ds, range(len(ds)), eval_tf)
    ds = load_dataset(Path(source), split=split, classes=classes)
    return Transformed(ds, range(len(ds)), eval_tf)


def make_loader(ds: Dataset, batch_size: int, train: bool, seed: int = 0,
                workers: int = 0, device: str = "cpu") -> DataLoader:
    """Shuffled, seeded loader for training (drops a last batch of 1); ordered for eval."""
    pin = str(device).startswith("cuda")
    return DataLoader(ds, batch_size=batch_size, shuffle=train, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed) if train else None,
                      drop_last=train and len(ds) % batch_size == 1, pin_memory=pin,
                      persistent_workers=workers > 0)


def _synthetic(task, n, seed, image_size, style, class_probs):
    images, labels = generate(task, n, seed, image_size=image_size, style=style,
                              class_probs=class_probs)
    return ArrayImageDataset(images, labels, list(TASKS[task]))


def _optional_split(path: Path, split: str, on_error: str, classes: list[str],
                    allow_outside: bool = False):
    if path.is_dir() and (path / split).is_dir() and (path / "train").is_dir():
        return load_dataset(path, split=split, on_error=on_error, classes=classes)
    if path.suffix == ".npz":
        with np.load(path) as z:
            if f"{split}_images" in z:
                return load_dataset(path, split=split)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            if any(row.get("split") == split for row in csv.DictReader(f)):
                return load_dataset(path, split=split, on_error=on_error, classes=classes,
                                    allow_outside=allow_outside)
    return None
