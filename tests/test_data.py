"""Tests for dataset loaders (good and bad input), splitting utilities and transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from moma_core.data.datasets import (
    ArrayImageDataset,
    DataError,
    class_counts,
    csv_manifest,
    image_folder,
    load_dataset,
    npz_arrays,
    split_indices,
)
from moma_core.data.transforms import StainJitter, build_transform, hed_to_rgb, rgb_to_hed

RNG = np.random.default_rng(0)


def _save_image(path: Path, size: int = 20, value: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
    if value is not None:
        pixels[:] = value
    Image.fromarray(pixels).save(path)
    return path


def _class_tree(root: Path, layout: dict[str, list[str]]) -> Path:
    for cls, names in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            _save_image(root / cls / name)
    return root


# --------------------------------------------------------------------------- arrays


def test_array_dataset_yields_pil_and_label() -> None:
    images = RNG.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    ds = ArrayImageDataset(images, [0, 1, 2, 1, 0], ["a", "b", "c"])
    image, label = ds[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), images[3]) and label == 1
    assert len(ds) == 5 and ds.targets == [0, 1, 2, 1, 0]
    assert class_counts(ds) == {"a": 2, "b": 2, "c": 1}


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((3, 8, 8), np.uint8), [0, 0, 0], "shape"),
        (np.zeros((3, 8, 8, 3), np.float32), [0, 0, 0], "uint8"),
        (np.zeros((3, 8, 8, 3), np.uint8), [0, 0], "labels"),
        (np.zeros((3, 8, 8, 3), np.uint8), [0, 1, 2], "label 2"),
        (np.zeros((3, 8, 8, 3), np.uint8), [0.0, 1.0, 0.5], "integers"),
    ],
)
def test_array_dataset_validates(images: np.ndarray, labels: list, match: str) -> None:
    with pytest.raises(DataError, match=match):
        ArrayImageDataset(images, labels, ["a", "b"])


# --------------------------------------------------------------------------- image folder


def test_image_folder_counts_and_items(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "data", {"TUM": ["1.png", "2.PNG", "3.tif"], "ADI": ["x.jpg"]})
    (root / "TUM" / "notes.txt").write_text("not an image")
    (root / "ADI" / "nested").mkdir()
    _save_image(root / "ADI" / "nested" / "y.bmp")
    ds = image_folder(root, transform=build_transform(16, train=False))
    assert ds.classes == ["ADI", "TUM"]
    assert class_counts(ds) == {"ADI": 2, "TUM": 3}
    assert ds.skipped == [] and len(ds) == 5
    tensor, label = ds[0]
    assert tensor.shape == (3, 16, 16) and label == 0


def test_image_folder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        image_folder(tmp_path / "nowhere")


def test_image_folder_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = _class_tree(tmp_path, {"STR": ["a.png"]})
    (root / "LYM").mkdir()
    (root / "LYM" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match="LYM"):
        image_folder(root)


def test_image_folder_rejects_unknown_class_folder(tmp_path: Path) -> None:
    root = _class_tree(tmp_path, {"STR": ["a.png"], "MUC": ["b.png"]})
    with pytest.raises(DataError, match="MUC"):
        image_folder(root, classes=["STR", "TUM"])
    ds = image_folder(root, classes=["TUM", "STR", "MUC"])
    assert ds.classes == ["TUM", "STR", "MUC"]
    assert class_counts(ds) == {"TUM": 0, "STR": 1, "MUC": 1}


def test_image_folder_corrupt_file_raise_or_skip(tmp_path: Path) -> None:
    root = _class_tree(tmp_path, {"a": ["ok1.png", "ok2.png"], "b": ["ok3.png"]})
    (root / "b" / "x.png").write_bytes(b"\x00garbage, not a png\xff" * 10)
    with pytest.raises(DataError, match="x.png"):
        image_folder(root)
    ds = image_folder(root, on_error="skip")
    assert len(ds.skipped) == 1 and ds.skipped[0].endswith("x.png")
    assert len(ds) == 3 and class_counts(ds) == {"a": 2, "b": 1}
    with pytest.raises(ValueError, match="on_error"):
        image_folder(root, on_error="ignore")


# --------------------------------------------------------------------------- CSV manifest


def _manifest(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_manifest_string_labels_and_patients(tmp_path: Path) -> None:
    for name in ("p1.png", "p2.png", "p3.png"):
        _save_image(tmp_path / "img" / name)
    csv_path = _manifest(
        tmp_path / "m.csv",
        ["path,label,patient_id", "img/p1.png,tumor,P01", "img/p2.png,normal,P01",
         "img/p3.png,tumor,P02"],
    )  # fmt: skip
    ds = csv_manifest(csv_path)
    assert ds.classes == ["normal", "tumor"] and ds.targets == [1, 0, 1]
    assert ds.patient_ids == ["P01", "P01", "P02"]
    image, label = ds[1]
    assert isinstance(image, Image.Image) and label == 0
    fixed = csv_manifest(csv_path, classes=["tumor", "normal", "stroma"])
    assert fixed.targets == [0, 1, 0] and class_counts(fixed)["stroma"] == 0


def test_csv_manifest_integer_labels_root_and_split(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _save_image(tmp_path / "images" / name)
    (tmp_path / "meta").mkdir()
    csv_path = _manifest(
        tmp_path / "meta" / "m.csv",
        ["path,label,split", "a.png,2,train", "b.png,0,train", "c.png,1,val"],
    )
    ds = csv_manifest(csv_path, root=tmp_path / "images")
    assert ds.classes == ["0", "1", "2"] and ds.targets == [2, 0, 1] and ds.patient_ids is None
    val = csv_manifest(csv_path, root=tmp_path / "images", split="val")
    assert val.targets == [1] and val.samples[0][0].endswith("c.png")


def test_csv_manifest_label_not_in_classes(tmp_path: Path) -> None:
    _save_image(tmp_path / "a.png")
    csv_path = _manifest(tmp_path / "m.csv", ["path,label", "a.png,tumor", "a.png,necrosis"])
    with pytest.raises(DataError, match=r"line 3.*necrosis"):
        csv_manifest(csv_path, classes=["tumor", "stroma"])


def test_csv_manifest_missing_column(tmp_path: Path) -> None:
    csv_path = _manifest(tmp_path / "m.csv", ["path,class", "a.png,tumor"])
    with pytest.raises(DataError, match="label"):
        csv_manifest(csv_path)


def test_csv_manifest_missing_image_file(tmp_path: Path) -> None:
    _save_image(tmp_path / "a.png")
    csv_path = _manifest(tmp_path / "m.csv", ["path,label", "a.png,x", "gone.png,y"])
    with pytest.raises(DataError, match="gone.png"):
        csv_manifest(csv_path)
    ds = csv_manifest(csv_path, on_error="skip")
    assert len(ds) == 1 and ds.skipped[0].endswith("gone.png") and ds.classes == ["x", "y"]


# --------------------------------------------------------------------------- NPZ


def _medmnist(path: Path, with_classes: bool = False) -> Path:
    arrays = {
        "train_images": RNG.integers(0, 256, (6, 28, 28), dtype=np.uint8),  # grayscale
        "train_labels": np.array([[0], [1], [2], [1], [0], [2]], dtype=np.uint8),
        "test_images": RNG.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8),
        "test_labels": np.array([[1], [0]], dtype=np.uint8),
    }
    if with_classes:
        arrays["classes"] = np.array(["adipose", "mucus", "tumor"])
    np.savez(path, **arrays)
    return path


def test_npz_arrays_grayscale_and_column_labels(tmp_path: Path) -> None:
    path = _medmnist(tmp_path / "pathmnist.npz")
    ds = npz_arrays(path)
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert ds.targets == [0, 1, 2, 1, 0, 2]
    image, _ = ds[0]
    rgb = np.asarray(image)
    assert rgb.shape == (28, 28, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert npz_arrays(_medmnist(tmp_path / "c.npz", True), "test").classes[2] == "tumor"


def test_npz_arrays_missing_split_lists_keys(tmp_path: Path) -> None:
    path = _medmnist(tmp_path / "pathmnist.npz")
    with pytest.raises(DataError, match=r"val.*train_images"):
        npz_arrays(path, split="val")
    with pytest.raises(DataError, match="not found"):
        npz_arrays(tmp_path / "absent.npz")


# --------------------------------------------------------------------------- dispatch


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    _class_tree(tmp_path / "kather" / "train", {"a": ["1.png", "2.png"], "b": ["3.png"]})
    _class_tree(tmp_path / "kather" / "val", {"a": ["4.png"], "b": ["5.png"]})
    assert len(load_dataset(tmp_path / "kather")) == 3
    assert len(load_dataset(str(tmp_path / "kather"), split="val")) == 2
    assert len(load_dataset(tmp_path / "kather" / "train", split="test")) == 3

    _save_image(tmp_path / "i.png")
    csv_path = _manifest(tmp_path / "m.csv", ["path,label", "i.png,a"])
    assert load_dataset(csv_path).classes == ["a"]

    npz = _medmnist(tmp_path / "p.npz")
    named = load_dataset(npz, split="test", classes=["x", "y", "z"])
    assert len(named) == 2 and named.classes == ["x", "y", "z"]

    (tmp_path / "data.parquet").write_text("")
    for bad in (tmp_path / "data.parquet", tmp_path / "missing.csv"):
        with pytest.raises(DataError):
            load_dataset(bad)


# --------------------------------------------------------------------------- utilities


def test_class_counts_of_subset() -> None:
    ds = ArrayImageDataset(np.zeros((4, 4, 4, 3), np.uint8), [0, 1, 1, 1], ["a", "b"])
    assert class_counts(Subset(ds, [1, 2])) == {"a": 0, "b": 2}


def test_split_indices_partition_and_stratify() -> None:
    labels = np.repeat([0, 1, 2, 3], [40, 40, 10, 10])
    parts = split_indices(100, (0.7, 0.2, 0.1), seed=3, labels=labels)
    assert [len(p) for p in parts] == [70, 20, 10]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(100))
    assert np.bincount(labels[parts[1]], minlength=4).tolist() == [8, 8, 2, 2]
    again = split_indices(100, (0.7, 0.2, 0.1), seed=3, labels=labels)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = split_indices(100, (0.7, 0.2, 0.1), seed=4, labels=labels)
    assert not np.array_equal(parts[1], other[1])
    assert [len(p) for p in split_indices(10, (1.0,))] == [10]
    with pytest.raises(ValueError, match="fractions"):
        split_indices(10, (0.5, 0.6))


# --------------------------------------------------------------------------- transforms


def test_eval_transform_is_deterministic_and_normalized() -> None:
    grey = Image.fromarray(np.full((40, 40, 3), (124, 116, 104), np.uint8))  # ~ImageNet mean
    tf = build_transform(32, train=False)
    out = tf(grey)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.abs().max() < 0.02
    image = Image.fromarray(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    assert torch.equal(tf(image), tf(image))


@pytest.mark.parametrize("augment", ["randaugment", "flip"])
def test_train_transform_is_random(augment: str) -> None:
    torch.manual_seed(0)
    image = Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    tf = build_transform(32, train=True, augment=augment, stain_jitter=0.05)
    outs = [tf(image) for _ in range(6)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_train_transform_without_augmentation_is_deterministic() -> None:
    image = Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    tf = build_transform(32, train=True, augment="none")
    assert torch.equal(tf(image), build_transform(32, train=False)(image))
    with pytest.raises(ValueError, match="augment"):
        build_transform(32, train=True, augment="mixup")


def test_stain_jitter_keeps_shape_and_changes_colour() -> None:
    arr = RNG.integers(30, 230, (24, 24, 3), dtype=np.uint8)
    jitter = StainJitter(0.2, generator=torch.Generator().manual_seed(1))
    out = jitter(arr)
    assert out.shape == arr.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - arr).mean() > 2
    pil_out = jitter(Image.fromarray(arr))
    assert isinstance(pil_out, Image.Image) and pil_out.size == (24, 24)
    assert np.array_equal(StainJitter(0.0)(arr), arr)
    with pytest.raises(ValueError):
        StainJitter(-0.1)


def test_hed_round_trip() -> None:
    arr = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    back = hed_to_rgb(rgb_to_hed(arr))
    assert np.abs(back.astype(int) - arr).max() <= 1
