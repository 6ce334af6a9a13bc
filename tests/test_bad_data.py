"""Bad site data, tried as a new user would: each case is one clear error (or handled as
stated), found by ``--check-only`` with the same decode as training."""

import io
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from moma_core.data.datasets import (
    ArrayImageDataset,
    DataError,
    csv_manifest,
    decode_image,
    image_folder,
    load_dataset,
)
from moma_core.sources import open_site_data


def _png(path, value=120, size=16, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode != "RGB" else (value, value, value)).save(path)
    return path


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
                    ).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact, data cut
    return path


def _corrupt_png(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
                    ).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") - 4  # the chunk: length, type, data, CRC
    length = int.from_bytes(data[start:start + 4], "big")
    body = start + 8
    data[body + 20: body + 200] = bytes(180)  # compressed pixel data damaged ...
    crc = zlib.crc32(bytes(data[start + 4: body + length]))
    data[body + length: body + length + 4] = crc.to_bytes(4, "big")  # ... with a valid CRC
    path.write_bytes(bytes(data))
    return path


def _folder(root, bad_maker=None):
    for cls in ("a", "b"):
        for i in range(4):
            _png(root / cls / f"{i}.png", 40 * i + 10)
    if bad_maker is not None:
        bad_maker(root / "a" / "bad.png")
    return root


@pytest.mark.parametrize("maker", [_truncated_jpeg, _corrupt_png])
def test_images_that_do_not_decode_fully_are_found_before_training(tmp_path, maker):
    bad = maker(tmp_path / "x")
    with Image.open(bad) as img:  # the header alone looks fine: a header check passes it
        img.verify()
    with pytest.raises(DataError, match="cannot read image"):
        decode_image(str(bad))
    root = _folder(tmp_path / "data", maker)
    with pytest.raises(DataError, match="bad.png"):
        open_site_data(str(root), image_size=16)
    data = open_site_data(str(root), image_size=16, on_error="skip")
    assert data.train.base.skipped == [str(root / "a" / "bad.png")]
    for split in (data.train, data.val):  # everything training would read now decodes
        for i in range(len(split)):
            split[i]


def test_check_only_reports_an_undecodable_image_with_one_line(tmp_path, monkeypatch, capsys):
    from client.cli import main

    root = _folder(tmp_path / "data", _truncated_jpeg)
    monkeypatch.setattr(sys, "argv", ["moma-client", "--data", str(root), "--cache-dir",
                                      str(tmp_path / "cache"), "--check-only"])
    assert main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.png" in err[0] and err[0].startswith("error: ")
    monkeypatch.setattr(sys, "argv", sys.argv + ["--skip-bad-images"])
    assert main() == 0
    assert "skipped 1 unreadable images" in capsys.readouterr().err


def test_a_decompression_bomb_is_named(tmp_path, monkeypatch):
    big = _png(tmp_path / "big.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64² = 4096 > 2 × 1000: an error
    with pytest.raises(DataError, match="decompression bomb"):
        decode_image(str(big))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1× and 2×: PIL only warns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="decompression bomb"):
            decode_image(str(big))


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    rgb = np.asarray(decode_image(str(path)))
    assert rgb.shape == (8, 8, 3) and 125 <= rgb.mean() <= 130  # not 255 (white)


def _manifest(tmp_path, labels, paths=None):
    for i in range(len(labels)):
        _png(tmp_path / f"{i}.png", 10 * i)
    paths = paths or [f"{i}.png" for i in range(len(labels))]
    rows = ["path,label"] + [f"{p},{lab}" for p, lab in zip(paths, labels, strict=True)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


@pytest.mark.parametrize("labels,classes,message", [
    (["0", "1", "-1"], None, "line 4: label -1 is not a class index"),
    (["a", "b", ""], None, "line 4: empty label"),
    (["0", "b", "1"], None, "line 3: label 'b' mixes integer and class-name labels"),
    (["0", "999999"], None, "line 3: label 999999 is not a class index (at most 1000"),
    (["a", "c"], ["a", "b"], "line 3: label 'c' not in classes"),
    (["0", "2"], ["a", "b"], "line 3: label 2 is not a class index 0..1"),
    (["a", "1"], ["a", "b"], "mixes integer and class-name labels"),
])
def test_manifest_labels_must_be_the_declared_classes(tmp_path, labels, classes, message):
    path = _manifest(tmp_path, labels)
    with pytest.raises(DataError) as err:
        csv_manifest(path, classes=classes)
    assert message in str(err.value) and str(path) in str(err.value)


def test_manifest_labels_of_one_kind_are_accepted(tmp_path):
    assert csv_manifest(_manifest(tmp_path, ["1", "0", "1"])).targets == [1, 0, 1]
    ds = csv_manifest(_manifest(tmp_path, ["b", "a"]), classes=["b", "a"])
    assert ds.targets == [0, 1] and ds.classes == ["b", "a"]


def test_manifest_paths_stay_inside_its_folder_unless_allowed(tmp_path):
    site = tmp_path / "site"
    outside = _png(tmp_path / "elsewhere" / "x.png")
    for path in ("../elsewhere/x.png", str(outside)):
        manifest = _manifest(site, ["a", "b"], paths=["0.png", path])
        with pytest.raises(DataError, match="leads outside"):
            csv_manifest(manifest)
        assert len(csv_manifest(manifest, allow_outside=True)) == 2
    (site / "link.png").symlink_to(outside)  # a symlink out of the folder is outside too
    with pytest.raises(DataError, match="leads outside"):
        csv_manifest(_manifest(site, ["a", "b"], paths=["0.png", "link.png"]))


def test_npz_float_labels_are_refused_unless_integral(tmp_path):
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "f.npz", train_images=images, train_labels=np.array([0.0, 1.7, 1.0]))
    with pytest.raises(DataError, match="labels must be integers"):
        load_dataset(tmp_path / "f.npz")
    np.savez(tmp_path / "i.npz", train_images=images, train_labels=np.array([0.0, 1.0, 1.0]))
    assert load_dataset(tmp_path / "i.npz").targets == [0, 1, 1]


def test_decoding_leaves_the_process_wide_warning_filters_alone(tmp_path):
    """Files are decoded in threads: ``warnings.catch_warnings`` there is not thread-safe (it
    left a DecompressionBombWarning 'error' filter behind, and let a bomb through meanwhile)."""
    from unittest import mock

    root = _folder(tmp_path / "data")
    with mock.patch.object(warnings, "catch_warnings",
                           side_effect=AssertionError("catch_warnings used while decoding")):
        assert len(image_folder(root)) == 8  # decoded in a thread pool


def test_declared_classes_that_look_like_integers_are_names(tmp_path):
    ds = csv_manifest(_manifest(tmp_path, ["5", "3", "4"]), classes=["3", "4", "5"])
    assert ds.targets == [2, 0, 1] and ds.classes == ["3", "4", "5"]


@pytest.mark.parametrize("labels,extra,message", [
    ([0, -1, 1], {}, "label -1 is not a class index"),
    ([0, 999999, 1], {}, "label 999999 is not a class index (at most 1000"),
    ([0, 2, 1], {"classes": np.array(["a", "b"])}, "label 2 is not a class index 0..1"),
])
def test_npz_labels_outside_the_classes_name_the_file(tmp_path, monkeypatch, labels, extra,
                                                     message):
    """The NPZ reader's own checks refuse these labels, naming the file: the range check of
    every labelled data set (the backstop, below) is switched off here."""
    from moma_core.data import datasets

    monkeypatch.setattr(datasets, "_check_label_range", lambda labels, n_classes: None)
    path = tmp_path / "d.npz"
    np.savez(path, train_images=np.zeros((3, 8, 8, 3), dtype=np.uint8),
             train_labels=np.array(labels), **extra)
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("labels", [[0, -1, 1], [0, 2, 1]])
def test_the_label_range_backstop_refuses_labels_outside_the_classes(labels):
    with pytest.raises(DataError, match=r"label (-1|2) out of range for 2 classes"):
        ArrayImageDataset(np.zeros((3, 8, 8, 3), dtype=np.uint8), labels, ["a", "b"])
    assert ArrayImageDataset(np.zeros((3, 8, 8, 3), dtype=np.uint8), [0, 1, 1],
                             ["a", "b"]).targets == [0, 1, 1]


@pytest.mark.parametrize("sidecar", [["not", "an", "object"], {"meta": {"epochs": 1}}])
def test_moma_teacher_sign_refuses_a_broken_sidecar_with_one_line(
        tmp_path, monkeypatch, capsys, sidecar):
    import json

    from moma_core.checkpoint import save_checkpoint, sidecar_path
    from moma_core.cli.teacher import main
    from moma_core.models import Architecture, build_model

    arch = Architecture("test_efficientnet", ("a", "b"), 32)
    path = tmp_path / "teacher.safetensors"
    digest = save_checkpoint(path, build_model(arch).state_dict(), arch,
                             {"epochs": 1, "source": "synthetic:source"})
    if isinstance(sidecar, dict):
        sidecar = {"sha256": digest, **sidecar}
    sidecar_path(path).write_text(json.dumps(sidecar))
    monkeypatch.setattr(sys, "argv", ["moma-teacher", "sign", str(path), "--key",
                                      str(tmp_path / "k.key")])
    assert main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "sidecar" in err[0]
