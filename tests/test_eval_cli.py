"""moma-eval, checkpoints that load everywhere, and split-labelled metrics of the standalone
commands.

Scores are checked on models whose predictions are known: a test_efficientnet whose classifier
ignores the image (zero weights, a one-hot bias) predicts one class for every image, so accuracy,
recall, confusion and loss follow from the class counts alone.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moma_core.checkpoint import CheckpointError, load_model, save_checkpoint, sidecar_path
from moma_core.evaluate import class_index_map
from moma_core.models import Architecture, build_model

BIN = Path(sys.executable).parent
SIZE = 32
TINY = ["--image-size", str(SIZE), "--batch-size", "8", "--device", "cpu", "--optimizer",
        "adamw", "--lr", "0.003", "--augment", "flip"]


def constant_model(path: Path, classes: tuple[str, ...], predict: str) -> Path:
    """A checkpoint whose model predicts ``predict`` for every image (logits = 10·one-hot)."""
    torch.manual_seed(0)
    arch = Architecture("test_efficientnet", classes, SIZE)
    model = build_model(arch)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[classes.index(predict)] = 10.0
    save_checkpoint(path, model.state_dict(), arch, {"purpose": "tests"})
    return path


def constant_loss(n_classes: int, n: int, n_right: int) -> float:
    """Mean cross-entropy of a 10·one-hot logit vector: right ones cost log(1+(C-1)e^-10),
    wrong ones 10 more."""
    base = math.log(1 + (n_classes - 1) * math.exp(-10))
    return base + 10.0 * (n - n_right) / n


def image_folder(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """``root/<split>/<class>/<i>.png``: tiny images, ``splits[split][class]`` of each."""
    rng = np.random.default_rng(0)
    for split, counts in splits.items():
        for name, count in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


TRAIN = {"a": 2, "b": 2, "c": 2}
TEST = {"a": 1, "b": 2, "c": 3}


def _one_line_error(r, text: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- load_model


def _global_checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module, Architecture]:
    """A checkpoint written as the coordinator writes one after a round (server.results)."""
    from moma_protocol.wire import wire_state
    from server.results import RunResults

    torch.manual_seed(1)
    arch = Architecture("test_efficientnet", ("benign", "grade_1", "grade_2", "grade_3"), SIZE)
    model = build_model(arch)
    for m in model.modules():  # a trained model's counters are not zero
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.num_batches_tracked.fill_(7)
    results = RunResults(tmp_path / "run")
    results.start({}, None, resume=False)
    results.add_round({"round": 1, "sites": {}}, wire_state(model.state_dict()), arch, {})
    return results.checkpoint_path(1), model, arch


def test_a_federation_global_checkpoint_loads_without_bn_counters(tmp_path):
    path, model, arch = _global_checkpoint(tmp_path)
    from safetensors.torch import load_file

    on_disk = load_file(str(path))
    counters = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
    assert counters and not any(k in on_disk for k in counters)  # really absent from the file
    loaded, loaded_arch, _ = load_model(path, expect=arch)
    assert loaded_arch == arch
    state = loaded.state_dict()
    for k, v in model.state_dict().items():
        if k in counters:
            assert int(state[k]) == 0  # the fresh model's own counter is kept
        else:
            assert torch.equal(state[k], v), k


def _resave(path: Path, arch: Architecture, change) -> Path:
    from safetensors.torch import load_file

    state = load_file(str(path))
    change(state)
    out = path.with_name("changed.safetensors")
    save_checkpoint(out, state, arch)
    return out


def test_a_missing_weight_or_stray_tensor_still_fails(tmp_path):
    path, _, arch = _global_checkpoint(tmp_path)
    bad = _resave(path, arch, lambda s: s.pop("classifier.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor classifier\.weight \(4, "):
        load_model(bad)
    bad = _resave(path, arch, lambda s: s.pop("bn1.running_var"))
    with pytest.raises(CheckpointError, match=r"missing tensor bn1\.running_var"):
        load_model(bad)
    bad = _resave(path, arch, lambda s: s.update(extra=torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor extra"):
        load_model(bad)
    bad = _resave(path, arch, lambda s: s.update({"bn1.num_batches_tracked": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"tensor bn1\.num_batches_tracked: shape \(3,\)"):
        load_model(bad)


def test_a_federation_global_checkpoint_scores_with_moma_eval(call, tmp_path):
    path, _, _ = _global_checkpoint(tmp_path)
    r = call("moma-eval", path, "--data", "synthetic:target", "--test-n", "12", "--device",
             "cpu")
    assert r.returncode == 0, r.stderr
    report = json.loads((path.parent / "global-round-001.eval-test" / "eval.json").read_text())
    assert report["num_examples"] == 12 and report["split"] == "test"


# --------------------------------------------------------------------------- class mapping


def test_class_index_map_matches_names_not_positions():
    assert class_index_map(("a", "b", "c"), ["a", "b", "c"]) == [0, 1, 2]
    assert class_index_map(("b", "c", "a"), ["a", "b", "c"]) == [2, 0, 1]
    with pytest.raises(ValueError, match=r"missing from the data: \['c'\].*not in the "
                                         r"checkpoint: \['d'\]"):
        class_index_map(("a", "b", "c"), ["a", "b", "d"])


# --------------------------------------------------------------------------- moma-eval


def test_scores_known_predictions_and_writes_json_and_markdown(call, tmp_path):
    data = image_folder(tmp_path / "data", {"train": TRAIN, "test": TEST})
    ckpt = constant_model(tmp_path / "m.safetensors", ("a", "b", "c"), predict="b")
    out = tmp_path / "out"
    r = call("moma-eval", ckpt, "--data", data, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "eval.json").read_text())
    m = report["metrics"]
    assert report["split"] == "test" and report["num_examples"] == 6
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["per_class_recall"] == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert m["per_class_support"] == {"a": 1, "b": 2, "c": 3}
    assert m["confusion"] == [[0, 1, 0], [0, 2, 0], [0, 3, 0]]
    assert m["loss"] == pytest.approx(constant_loss(3, 6, 2), rel=1e-5)
    assert report["classes"] == ["a", "b", "c"] and not report["class_order_remapped"]
    md = (out / "eval.md").read_text()
    assert "| accuracy | 0.3333 |" in md and "| b | 1.0000 | 2 |" in md
    assert "| true \\ predicted | a | b | c |" in md and "| c | 0 | 3 | 0 |" in md
    assert "test accuracy 0.333" in r.stdout and "(n=6)" in r.stdout
    metric_lines = [line for line in r.stdout.splitlines() if "accuracy" in line
                    or "recall" in line]
    assert metric_lines and all(line.startswith("test ") for line in metric_lines)


def test_same_classes_in_another_order_are_remapped_by_name(call, tmp_path):
    """The checkpoint lists b, c, a; the data (folders, sorted) a, b, c. Without remapping, the
    model's index 0 ("b") would be scored as the data's label 0 ("a"): accuracy 1/6, not 2/6."""
    data = image_folder(tmp_path / "data", {"train": TRAIN, "test": TEST})
    ckpt = constant_model(tmp_path / "m.safetensors", ("b", "c", "a"), predict="b")
    r = call("moma-eval", ckpt, "--data", data, "--out", tmp_path / "out", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    m = report["metrics"]
    assert report["classes"] == ["b", "c", "a"] and report["data_classes"] == ["a", "b", "c"]
    assert report["class_order_remapped"]
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["per_class_recall"] == {"b": 1.0, "c": 0.0, "a": 0.0}
    assert m["confusion"] == [[2, 0, 0], [3, 0, 0], [1, 0, 0]]  # checkpoint order b, c, a
    assert m["loss"] == pytest.approx(constant_loss(3, 6, 2), rel=1e-5)
    assert "matched by name" in r.stdout


def test_val_split_and_the_default_output_folder(call, tmp_path):
    data = image_folder(tmp_path / "data", {"train": TRAIN, "val": {"a": 3, "b": 1, "c": 1}})
    ckpt = constant_model(tmp_path / "ck" / "student.safetensors", ("a", "b", "c"), "a")
    r = call("moma-eval", ckpt, "--data", data, "--split", "val", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "ck" / "student.eval-val" / "eval.json").read_text())
    assert report["split"] == "val" and report["num_examples"] == 5
    assert report["metrics"]["accuracy"] == pytest.approx(3 / 5)
    assert "val accuracy 0.600" in r.stdout and "(n=5)" in r.stdout
    assert "test" not in r.stdout.replace(str(tmp_path), "")


def test_different_class_names_are_one_error_listing_both(call, tmp_path):
    data = image_folder(tmp_path / "data", {"train": TRAIN, "test": {"a": 1, "b": 1, "d": 1}})
    ckpt = constant_model(tmp_path / "m.safetensors", ("a", "b", "c"), "a")
    r = call("moma-eval", ckpt, "--data", data, "--out", tmp_path / "out")
    _one_line_error(r, "the data's classes ['a', 'b', 'd'] are not the checkpoint's "
                       "['a', 'b', 'c']")
    assert not (tmp_path / "out").exists()


def _empty_test_npz(path: Path) -> Path:
    np.savez(path, train_images=np.zeros((4, 8, 8, 3), np.uint8),
             train_labels=np.array([0, 1, 0, 1]), test_images=np.zeros((0, 8, 8, 3), np.uint8),
             test_labels=np.zeros((0,), np.int64), classes=np.array(["a", "b"]))
    return path


def _bad_case(tmp_path: Path, case: str) -> tuple[list, str]:
    """Arguments of a bad call and the text its one error line must hold."""
    ckpt = constant_model(tmp_path / "m.safetensors", ("a", "b", "c"), "a")
    folder = image_folder(tmp_path / "data", {"train": TRAIN})
    if case == "missing checkpoint":
        return [tmp_path / "absent.safetensors", "--data", folder], "no such checkpoint"
    if case == "pickle":
        pickle = tmp_path / "m.pt"
        torch.save(build_model(Architecture("test_efficientnet", ("a", "b"), SIZE)
                               ).state_dict(), pickle)
        return [pickle, "--data", folder], "refusing to load a pickle"
    if case == "no sidecar":
        sidecar_path(ckpt).unlink()
        return [ckpt, "--data", folder], "sidecar m.json is missing"
    if case == "unknown split":
        return [ckpt, "--data", folder, "--split", "tset"], "unknown split 'tset'"
    if case == "no test split":
        return [ckpt, "--data", folder], "has no 'test' split; it has: train, val"
    if case == "empty split":
        ckpt2 = constant_model(tmp_path / "ab.safetensors", ("a", "b"), "a")
        return [ckpt2, "--data", _empty_test_npz(tmp_path / "d.npz")], "split of"
    if case == "no data":
        return [ckpt], "--data is required"
    return [ckpt, "--data", tmp_path / "nowhere"], "no such file or directory"


@pytest.mark.parametrize("case", ["missing checkpoint", "pickle", "no sidecar", "unknown split",
                                  "no test split", "empty split", "no data", "no such data"])
def test_bad_input_is_one_line_and_exit_2(call, tmp_path, case):
    args, text = _bad_case(tmp_path, case)
    r = call("moma-eval", *args, "--out", tmp_path / "out")
    _one_line_error(r, text)
    if case == "empty split":
        assert "is empty" in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_installed_script_exists_and_fails_cleanly(tmp_path):
    r = subprocess.run([str(BIN / "moma-eval"), str(tmp_path / "absent.safetensors"), "--data",
                        "synthetic:target"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no such checkpoint" in r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- the trainers


def _metric_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "accuracy" in line]


def test_teacher_records_and_labels_val_and_test_and_moma_eval_agrees(call, tmp_path):
    out = tmp_path / "teacher.safetensors"
    r = call("moma-teacher", "--model", "test_efficientnet", "--n", "16", "--test-n", "20",
             "--epochs", "1", "--out", out, *TINY)
    assert r.returncode == 0, r.stderr
    lines = _metric_lines(r.stderr)
    assert any("val accuracy" in line for line in lines)
    assert any("test accuracy" in line and "(n=20)" in line for line in lines)
    assert all("val accuracy" in line or "test accuracy" in line for line in lines)
    meta = json.loads(sidecar_path(out).read_text())["meta"]
    assert meta["test_num_examples"] == 20 and 0.0 <= meta["test_accuracy"] <= 1.0
    r = call("moma-eval", out, "--data", "synthetic:source", "--test-n", "20", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "teacher.eval-test" / "eval.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(meta["test_accuracy"])
    assert report["metrics"]["kappa"] == pytest.approx(meta["test_kappa"])


def test_distill_scores_a_folder_test_split_and_labels_it(call, tmp_path):
    data = image_folder(tmp_path / "data", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2},
                                            "test": {"a": 3, "b": 2}})
    r = call("moma-distill", "--objective", "ce", "--model", "test_efficientnet", "--source",
             data, "--epochs", "1", "--runs-dir", tmp_path / "runs", "--name", "d", *TINY)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "runs" / "d" / "results.json").read_text())
    test = results["final"]["test"]
    assert test["num_examples"] == 5 and sum(map(sum, test["confusion"])) == 5
    lines = _metric_lines(r.stderr)
    assert any(f"test accuracy {test['accuracy']:.3f}" in line and "(n=5)" in line
               for line in lines)
    assert all("val accuracy" in line or "test accuracy" in line for line in lines)
    r = call("moma-eval", tmp_path / "runs" / "d" / "student.safetensors", "--data", data,
             "--device", "cpu", "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["metrics"]["confusion"] == test["confusion"]
    assert report["metrics"]["accuracy"] == pytest.approx(test["accuracy"])
