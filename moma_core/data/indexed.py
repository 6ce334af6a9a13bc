"""A dataset wrapper that also yields each sample's index (for per-sample memory banks).

CRCKD (:mod:`moma_core.crckd`) keeps one memory-bank row per training sample and needs, for
every sample of a batch, its position ``i`` in the training set: ``WithIndex(ds)[i]`` is
``(x, y, i)``, and the default collate turns the indices into a LongTensor. Wrap the final
training set (after any ``Subset``/split), so that indices run over ``0..len(ds)-1`` and the
bank size is ``len(WithIndex(ds))``.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class WithIndex(Dataset):
    """Items of ``dataset`` as ``(x, y, i)``; ``classes``, ``targets`` and ``patient_ids``
    kept when present."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        for name in ("classes", "targets", "patient_ids"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n}")
        item = self.dataset[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise TypeError(f"WithIndex wraps datasets of (x, y) items, got {type(item).__name__}")
        x, y = item
        return x, y, i
