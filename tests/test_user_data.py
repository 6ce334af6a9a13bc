"""A user's own files: site data checks before connecting, CSV splits, partitioned simulation."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from moma_core.data.synthetic import TARGET_CLASSES, generate
from moma_core.sources import open_site_data

BIN = Path(sys.executable).parent


def _image_folder(root: Path, per_class: int = 12) -> Path:
    images, labels = generate("target", per_class * 4, seed=3, image_size=32)
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        folder = root / TARGET_CLASSES[y]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    return root


def test_moma_client_checks_data_and_reports_counts(call, tmp_path):
    root = _image_folder(tmp_path / "slides")
    r = call("moma-client", "--server", "127.0.0.1:1", "--data", root,
             "--cache-dir", tmp_path / "cache", "--check-only")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stderr.split())  # the console wraps long lines (a long data path)
    assert "benign=" in text and "grade_3=" in text and "36 train / 12 val" in text
    (root / "grade_1" / "broken.png").write_bytes(b"not an image")
    r = call("moma-client", "--server", "127.0.0.1:1", "--data", root,
             "--cache-dir", tmp_path / "cache", "--insecure")
    assert r.returncode == 2 and "broken.png" in r.stderr  # refused before connecting
    assert "connecting" not in r.stderr


def test_csv_split_column_gives_the_validation_set(tmp_path):
    root = _image_folder(tmp_path / "slides", per_class=6)
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for i, p in enumerate(sorted(root.rglob("*.png"))):
            w.writerow([p.relative_to(tmp_path), p.parent.name, "val" if i % 3 == 0 else "train"])
    data = open_site_data(str(manifest), image_size=32, augment="none")
    assert (len(data.train), len(data.val)) == (16, 8)
    assert data.classes == list(TARGET_CLASSES)


@pytest.mark.slow
@pytest.mark.ray
def test_simulation_on_a_partitioned_user_dataset(tmp_path):
    from tests.helpers import tiny_teacher

    root = _image_folder(tmp_path / "slides")
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    r = subprocess.run([sys.executable, "-m", "server.simulate", "--name", "user", "--runs-dir",
                        tmp_path / "runs", "--teacher", teacher, "--sites", "2", "--rounds", "1",
                        "--data", root, "--partitioner", "dirichlet", "--alpha", "1.0",
                        "--image-size", "32", "--queue-size", "64", "--batch-size", "8",
                        "--optimizer", "adamw", "--lr", "0.003", "--augment", "flip"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    sites = json.loads((tmp_path / "runs" / "user" / "sites.json").read_text())
    counts = []
    for site in sites:
        with open(site["data-path"], newline="") as f:
            counts.append(sum(1 for _ in csv.DictReader(f)))
    assert sum(counts) == 48
    results = json.loads((tmp_path / "runs" / "user" / "results.json").read_text())
    sites_ok = [s for s in results["rounds"][0]["sites"].values() if s["status"] == "ok"]
    assert len(sites_ok) == 2
    assert sorted(s["num_examples"] for s in sites_ok) != [0, 0]


def _site_args(tmp_path, *extra):
    from server.simulate import parser, settings

    return settings(parser().parse_args(["--runs-dir", str(tmp_path / "runs"), *map(str, extra)]))


def test_site_data_options_are_checked_and_classes_come_from_the_sites(tmp_path):
    import shutil

    from moma_protocol.settings import ConfigError
    from server.simulate import site_configs

    a = _image_folder(tmp_path / "hospital-a", per_class=3)
    b = _image_folder(tmp_path / "hospital-b", per_class=3)
    shutil.rmtree(b / TARGET_CLASSES[-1])  # this hospital has no image of the last class
    for bad, text in ([("--site-data", a, "--data", a), "exclude each other"],
                      [("--site-data", a, b, "--sites", "3"), "leave --sites out"],
                      [("--site-data", a, tmp_path / "nowhere"), "no such file"]):
        with pytest.raises(ConfigError, match=text):
            _site_args(tmp_path, *bad)
    args = _site_args(tmp_path, "--site-data", a, b)
    sites, classes = site_configs(args, tmp_path / "runs" / "x", 0)
    assert args.sites == 2 and [s["site-name"] for s in sites] == ["hospital-a", "hospital-b"]
    assert classes == tuple(sorted(TARGET_CLASSES))  # the union, in name order
    with pytest.raises(ConfigError, match="lacks"):
        site_configs(_site_args(tmp_path, "--site-data", a, b, "--classes", "benign,grade_1"),
                     tmp_path / "runs" / "x", 0)


@pytest.mark.slow
@pytest.mark.ray
def test_simulation_with_one_dataset_per_site(tmp_path):
    """Two hospitals' folders; one lacks a class: both train, labels mapped by class name."""
    import shutil

    from tests.helpers import tiny_teacher

    a = _image_folder(tmp_path / "hospital-a", per_class=6)
    b = _image_folder(tmp_path / "hospital-b", per_class=6)
    shutil.rmtree(b / TARGET_CLASSES[0])
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    r = subprocess.run([sys.executable, "-m", "server.simulate", "--name", "h", "--runs-dir",
                        tmp_path / "runs", "--teacher", teacher, "--rounds", "1",
                        "--site-data", a, b, "--image-size", "32", "--queue-size", "64",
                        "--batch-size", "8", "--optimizer", "adamw", "--lr", "0.003",
                        "--augment", "flip"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "h" / "results.json").read_text())
    assert results["config"]["classes"] == ",".join(sorted(TARGET_CLASSES))
    sites = {s["site_name"]: s for s in results["rounds"][0]["sites"].values()}
    assert set(sites) == {"hospital-a", "hospital-b"}
    assert all(s["status"] == "ok" for s in sites.values())
