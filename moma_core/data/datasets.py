"""Dataset loaders for histology patches: in-memory arrays, class folders, CSV manifests, NPZ.

Every loader returns a ``torch.utils.data.Dataset`` with ``classes: list[str]`` and
``targets: list[int]`` that yields ``(transform(image), label)`` where ``image`` is an RGB
``PIL.Image`` (returned as is when ``transform`` is None). Problems with user data (missing
files, empty class folders, unreadable images, unknown labels, missing columns or keys) raise
:class:`DataError` naming the offending file, folder, label or key, at construction time so that
they surface before training starts.
"""

from __future__ import annotations

import csv
import os
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset

from moma_core.errors import DataError  # noqa: F401 (re-exported)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "DataError",
    "FileImageDataset",
    "class_counts",
    "csv_manifest",
    "image_folder",
    "load_dataset",
    "npz_arrays",
    "split_indices",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ON_ERROR = ("raise", "skip")
_ROW = "\0row"  # key holding a manifest row's line number (the header is line 1)
_PIL_ERRORS = (OSError, EOFError, SyntaxError, ValueError)


# --------------------------------------------------------------------------- datasets


class ArrayImageDataset(Dataset):
    """Images held in a uint8 array ``(N, H, W, 3)`` with integer labels into ``classes``."""

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        transform: Callable | None = None,
    ) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(
                f"images must be a uint8 array of shape (N, H, W, 3), got {images.dtype} "
                f"{images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"labels must have shape ({len(images)},), got {labels.shape}")
        if len(labels) and not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels must be integers, got {labels.dtype}")
        _check_label_range(labels, len(classes))
        self.images = images
        self.targets: list[int] = labels.astype(np.int64).tolist()
        self.classes: list[str] = [str(c) for c in classes]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = Image.fromarray(self.images[index])
        return _apply(self.transform, image), self.targets[index]


class FileImageDataset(Dataset):
    """Images read lazily from files; built by :func:`image_folder` and :func:`csv_manifest`.

    ``samples`` holds ``(path, label)``; ``skipped`` lists unreadable files dropped with
    ``on_error="skip"``; ``patient_ids`` is aligned with ``samples`` when known.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        transform: Callable | None = None,
        skipped: Sequence[str] = (),
        patient_ids: Sequence[str] | None = None,
    ) -> None:
        self.samples: list[tuple[str, int]] = [(str(p), int(y)) for p, y in samples]
        self.classes: list[str] = list(classes)
        self.targets: list[int] = [y for _, y in self.samples]
        self.transform = transform
        self.skipped: list[str] = list(skipped)
        self.patient_ids: list[str] | None = None if patient_ids is None else list(patient_ids)
        _check_label_range(np.asarray(self.targets), len(self.classes))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[object, int]:
        path, label = self.samples[index]
        return _apply(self.transform, decode_image(path)), label


def decode_image(path: str) -> Image.Image:
    """Read and fully decode an image file into 8-bit RGB — the one decode of training,
    evaluation and ``--check-only``.

    16-bit images are scaled to 8 bits (not clipped); a decompression bomb (more pixels than
    PIL's ``Image.MAX_IMAGE_PIXELS``) is refused as such; anything PIL cannot decode to the
    last pixel (truncated or corrupt data) is a :class:`DataError` naming the file.
    """
    try:
        with Image.open(path) as img:
            _refuse_bomb(img, path)
            img.load()
            return _to_8bit_rgb(img)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(path) from exc  # PIL's own check (the warning only where made an error)
    except FileNotFoundError as exc:
        raise DataError(f"missing image file: {path}") from exc
    except _PIL_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def _bomb(path: str) -> DataError:
    return DataError(f"image {path} is a decompression bomb (more than "
                     f"{Image.MAX_IMAGE_PIXELS} pixels): refused")


def _refuse_bomb(img: Image.Image, path: str) -> None:
    """PIL only warns between 1x and 2x ``MAX_IMAGE_PIXELS``; refuse those too, without
    touching the (process-wide, not thread-safe) warning filters."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise _bomb(path)


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


def _apply(transform: Callable | None, image: Image.Image) -> object:
    return image if transform is None else transform(image)


def _check_label_range(labels: np.ndarray, n_classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        bad = labels[(labels < 0) | (labels >= n_classes)][0]
        raise DataError(f"label {bad} out of range for {n_classes} classes")


# --------------------------------------------------------------------------- file checks


_DECODED: set[tuple] = set()  # files that decoded fully: (path, mtime, size, pixel limit)


def _problem(path: str) -> str | None:
    """Why ``path`` cannot be used (decoded as training will decode it), or None.

    A file that decoded fully is remembered (until it changes) so that reopening a site's data
    each round does not decode everything again in a long-lived process."""
    try:
        st = os.stat(path)
        key: tuple | None = (path, st.st_mtime_ns, st.st_size, Image.MAX_IMAGE_PIXELS)
    except OSError:
        key = None
    if key in _DECODED:
        return None
    try:
        decode_image(path)
    except DataError as exc:
        return str(exc)
    if key is not None:
        _DECODED.add(key)
    return None


def _check_files(paths: Sequence[str], on_error: str) -> set[str]:
    """Decode every file fully (threaded); raise on the first bad one or return the bad set."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(_problem, paths, chunksize=64))
    bad = [(p, why) for p, why in zip(paths, problems, strict=True) if why]
    if bad and on_error == "raise":
        more = f" (and {len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0][1]}{more}")
    return {p for p, _ in bad}


def _file_dataset(
    samples: list[tuple[str, int]],
    classes: Sequence[str],
    transform: Callable | None,
    on_error: str,
    source: Path,
    patient_ids: list[str] | None = None,
) -> FileImageDataset:
    """Drop (or raise on) unreadable files and build the dataset; empty result -> DataError."""
    bad = _check_files([p for p, _ in samples], on_error)
    keep = [i for i, (p, _) in enumerate(samples) if p not in bad]
    if not keep:
        raise DataError(f"no readable images in {source}")
    pids = None if patient_ids is None else [patient_ids[i] for i in keep]
    return FileImageDataset([samples[i] for i in keep], classes, transform, sorted(bad), pids)


# --------------------------------------------------------------------------- image folder


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_folders(root: Path, classes: Sequence[str] | None) -> tuple[list[str], list[Path]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"no class folders in {root}")
    if classes is None:
        return [p.name for p in folders], folders
    unknown = [p.name for p in folders if p.name not in classes]
    if unknown:
        raise DataError(f"class folder {root / unknown[0]} is not in classes {list(classes)}")
    return list(classes), folders


def image_folder(
    root: str | Path,
    transform: Callable | None = None,
    on_error: str = "raise",
    classes: Sequence[str] | None = None,
) -> FileImageDataset:
    """Class-per-folder layout (``root/<class>/**/*.png`` ...), e.g. Kather NCT-CRC-HE-100K.

    ``classes`` fixes the label order (a folder not in it is an error; a class without a folder
    simply has no samples). Unreadable images raise :class:`DataError` (``on_error="raise"``) or
    are dropped and listed in ``dataset.skipped`` (``on_error="skip"``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    class_names, folders = _class_folders(root, classes)
    samples: list[tuple[str, int]] = []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if _is_image(p))
        if not files:
            raise DataError(f"class folder {folder} contains no images ({IMAGE_EXTENSIONS})")
        label = class_names.index(folder.name)
        samples.extend((str(p), label) for p in files)
    return _file_dataset(samples, class_names, transform, on_error, root)


# --------------------------------------------------------------------------- CSV manifest


def _read_manifest(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"manifest {path} lacks column(s) {sorted(missing)}; header is {reader.fieldnames}"
            )
        rows = [
            {k: (v or "").strip() for k, v in row.items() if k} | {_ROW: str(reader.line_num)}
            for row in reader
        ]
    if not rows:
        raise DataError(f"manifest {path} has no rows")
    return rows


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


MAX_CLASSES = 1000


def _label_index(
    rows: list[dict[str, str]], classes: Sequence[str] | None, path: Path
) -> tuple[list[str], list[int]]:
    """Map row labels to class indices: the declared class names, or else one kind for every
    row — all class names or all integers 0..C-1 — never a class beyond the declared ones
    (without declared classes: the sorted names, or integers below ``MAX_CLASSES``)."""
    for row in rows:
        if not row["label"]:
            raise DataError(f"{path} line {row[_ROW]}: empty label")
    declared = None if classes is None else [str(c) for c in classes]
    if declared is not None and all(r["label"] in declared for r in rows):
        lookup = {c: i for i, c in enumerate(declared)}  # names win (classes "3","4","5")
        return declared, [lookup[r["label"]] for r in rows]
    first_int = _is_int(rows[0]["label"])
    mixed = next((r for r in rows if _is_int(r["label"]) != first_int), None)
    if mixed is not None:
        raise DataError(f"{path} line {mixed[_ROW]}: label {mixed['label']!r} mixes integer "
                        "and class-name labels; use one kind for every row")
    if first_int:
        return _integer_labels(rows, declared, path)
    return _name_labels(rows, declared, path)


def _integer_labels(
    rows: list[dict[str, str]], declared: list[str] | None, path: Path
) -> tuple[list[str], list[int]]:
    values = [int(r["label"]) for r in rows]
    if declared is None:
        top = max(values)
        if top >= MAX_CLASSES:
            row = rows[values.index(top)]
            raise DataError(f"{path} line {row[_ROW]}: label {top} is not a class index "
                            f"(at most {MAX_CLASSES} classes; name the classes instead)")
        declared = [str(i) for i in range(max(top, 0) + 1)]
    for row, value in zip(rows, values, strict=True):
        if not 0 <= value < len(declared):
            raise DataError(f"{path} line {row[_ROW]}: label {value} is not a class index "
                            f"0..{len(declared) - 1}")
    return declared, values


def _name_labels(
    rows: list[dict[str, str]], declared: list[str] | None, path: Path
) -> tuple[list[str], list[int]]:
    names = declared if declared is not None else sorted({r["label"] for r in rows})
    lookup = {c: i for i, c in enumerate(names)}
    for row in rows:
        if row["label"] not in lookup:
            raise DataError(f"{path} line {row[_ROW]}: label {row['label']!r} not in classes "
                            f"{names}")
    return names, [lookup[r["label"]] for r in rows]


def csv_manifest(
    path: str | Path,
    transform: Callable | None = None,
    on_error: str = "raise",
    classes: Sequence[str] | None = None,
    root: str | Path | None = None,
    split: str | None = None,
    allow_outside: bool = False,
) -> FileImageDataset:
    """CSV with header ``path,label[,patient_id][,split]``.

    Relative paths resolve against ``root`` (default: the CSV's folder); a path that leads
    outside that folder (``../x.png``, an absolute path elsewhere, a symlink out) is refused
    unless ``allow_outside``. Labels are class names or integer indices, one kind
    (:func:`_label_index`); classes default to the sorted unique names (``0..max`` for
    integers).
    With ``split`` given and a ``split`` column present, only matching rows are kept.
    Missing files count as unreadable images (see ``on_error``).
    """
    path = Path(path)
    rows = _read_manifest(path)
    if split is not None and "split" in rows[0]:
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise DataError(f"manifest {path} has no rows with split {split!r}")
    base = Path(root) if root is not None else path.parent
    for row in rows:
        if not row["path"]:
            raise DataError(f"{path} row {row[_ROW]}: empty path")
    if not allow_outside:
        inside = base.resolve()
        for row in rows:
            if not (base / row["path"]).resolve().is_relative_to(inside):
                raise DataError(f"{path} line {row[_ROW]}: path {row['path']!r} leads outside "
                                f"{base}; allow it with --allow-outside-paths (node config "
                                "allow-outside-paths)")
    class_names, labels = _label_index(rows, classes, path)
    samples = [(str(base / r["path"]), y) for r, y in zip(rows, labels, strict=True)]
    pids = [r["patient_id"] for r in rows] if "patient_id" in rows[0] else None
    return _file_dataset(samples, class_names, transform, on_error, path, pids)


# --------------------------------------------------------------------------- NPZ arrays


def _to_rgb(images: np.ndarray, source: str) -> np.ndarray:
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{source}: expected (N,H,W) or (N,H,W,3) images, got {images.shape}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255:
            raise DataError(f"{source}: images must be uint8-valued, got {images.dtype}")
        images = images.astype(np.uint8)
    return images


def _npz_labels(data: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """Labels ``key`` as int64 class indices: (N,) or (N,1), integer-valued, non-negative."""
    labels = data[key]
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{path}:{key}: expected single-label (N,) or (N,1), got {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        bad = labels.flat[0]
        if np.issubdtype(labels.dtype, np.floating):
            wrong = labels[~np.isfinite(labels) | (labels != np.round(labels))]
            bad = wrong[0] if wrong.size else None
        if bad is not None:
            raise DataError(f"{path}:{key}: labels must be integers (class indices), got "
                            f"{labels.dtype} values such as {bad.item()!r}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}:{key}: label {labels.min()} is not a class index")
    return labels


def _npz_classes(data: np.lib.npyio.NpzFile, path: Path) -> list[str]:
    if "classes" in data.files:
        return [str(c) for c in data["classes"].tolist()]
    label_keys = [k for k in data.files if k.endswith("_labels")]
    maxima = [int(labels.max()) for k in label_keys
              if (labels := _npz_labels(data, k, path)).size]
    n_classes = max(maxima, default=-1) + 1
    if n_classes > MAX_CLASSES:
        raise DataError(f"{path}: label {n_classes - 1} is not a class index (at most "
                        f"{MAX_CLASSES} classes without a 'classes' array)")
    return [f"class_{i}" for i in range(n_classes)]


def npz_arrays(
    path: str | Path, split: str = "train", transform: Callable | None = None
) -> ArrayImageDataset:
    """MedMNIST-style ``.npz`` (``{split}_images``, ``{split}_labels``; optional ``classes``).

    Labels must be integer class indices (float arrays of whole numbers are accepted)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read npz file {path}: {exc}") from exc
    with data:
        keys = [f"{split}_images", f"{split}_labels"]
        if any(k not in data.files for k in keys):
            raise DataError(
                f"{path} has no split {split!r} (needs {keys}); "
                f"available keys: {sorted(data.files)}"
            )
        images = _to_rgb(data[keys[0]], f"{path}:{keys[0]}")
        labels = _npz_labels(data, keys[1], path)
        classes = _npz_classes(data, path)
    if labels.size and labels.max() >= len(classes):
        raise DataError(f"{path}:{keys[1]}: label {labels.max()} is not a class index "
                        f"0..{len(classes) - 1}")
    return ArrayImageDataset(images, labels, classes, transform)


# --------------------------------------------------------------------------- dispatch & utils


def load_dataset(
    spec: str | Path,
    split: str = "train",
    transform: Callable | None = None,
    on_error: str = "raise",
    classes: Sequence[str] | None = None,
    allow_outside: bool = False,
) -> Dataset:
    """Open a dataset by path: a class-folder directory (``root/<split>`` if present), a
    ``.csv`` manifest (rows of ``split`` if it has a split column) or a MedMNIST ``.npz``."""
    path = Path(spec)
    if path.is_dir():
        folder = path / split if (path / split).is_dir() else path
        return image_folder(folder, transform, on_error, classes)
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return csv_manifest(path, transform, on_error, classes, split=split,
                            allow_outside=allow_outside)
    if suffix == ".npz":
        dataset = npz_arrays(path, split, transform)
        if classes is not None:
            if len(classes) != len(dataset.classes):
                raise DataError(
                    f"{path} has {len(dataset.classes)} classes, got {len(classes)} names"
                )
            dataset.classes = list(classes)
        return dataset
    raise DataError(f"unsupported dataset {path}: expected a folder, .csv or .npz")


def _targets_and_classes(dataset: Dataset) -> tuple[list[int], list[str]]:
    if isinstance(dataset, Subset):
        targets, classes = _targets_and_classes(dataset.dataset)
        return [targets[i] for i in dataset.indices], classes
    return list(dataset.targets), list(dataset.classes)


def class_counts(dataset: Dataset) -> dict[str, int]:
    """Samples per class name (classes without samples included with 0); handles ``Subset``."""
    targets, classes = _targets_and_classes(dataset)
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(classes))
    return {name: int(c) for name, c in zip(classes, counts, strict=True)}


def largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """``n`` split in proportion to ``fractions`` (summing to 1), each part an integer: the
    largest remainders get the leftover units (ties: the earlier part)."""
    frac = np.asarray(fractions, dtype=float)
    if frac.ndim != 1 or len(frac) < 1 or (frac < 0).any() or not np.isclose(frac.sum(), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    sizes = np.floor(frac * n).astype(int)
    order = np.argsort(-(frac * n - sizes), kind="stable")
    sizes[order[: n - sizes.sum()]] += 1
    return sizes.tolist()



def split_indices(
    n: int,
    fractions: Sequence[float] = (0.8, 0.2),
    seed: int = 0,
    labels: Sequence[int] | np.ndarray | None = None,
) -> list[np.ndarray]:
    """Random disjoint index sets covering ``range(n)`` with the given fractions (sorted).

    Stratified by ``labels`` when given; a part falls back to a plain random split where a
    class is too small to stratify.
    """
    sizes = largest_remainder(n, fractions)
    y = None if labels is None else np.asarray(labels)
    if y is not None and len(y) != n:
        raise ValueError(f"labels has length {len(y)}, expected {n}")
    remaining = np.arange(n)
    parts = []
    for size in sizes[:-1]:
        if size == 0 or size == len(remaining):
            take = remaining if size else remaining[:0]
            parts.append(take)
            remaining = remaining[len(take) :]
            continue
        rest, take = _split_off(remaining, size, seed + len(parts), y)
        parts.append(take)
        remaining = rest
    parts.append(remaining)
    return [np.sort(p) for p in parts]


def _split_off(
    idx: np.ndarray, size: int, seed: int, labels: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    strat = None if labels is None else labels[idx]
    try:
        rest, take = train_test_split(idx, test_size=size, random_state=seed, stratify=strat)
    except ValueError:  # a class with too few members to stratify
        rest, take = train_test_split(idx, test_size=size, random_state=seed)
    return rest, take
