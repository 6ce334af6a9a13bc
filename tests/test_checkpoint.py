"""Checkpoints: safetensors round trip, refusal of pickles, mismatched teachers, tampering."""

import json

import pytest
import torch

from moma_core.checkpoint import (
    CheckpointError,
    load_model,
    refuse_pickle,
    save_checkpoint,
    sha256_file,
    sidecar_path,
)
from moma_core.models import Architecture, build_model

ARCH = Architecture("test_efficientnet", ("a", "b", "c", "d"), image_size=32)


def _saved(tmp_path, arch=ARCH):
    torch.manual_seed(0)
    model = build_model(arch)
    path = tmp_path / "teacher.safetensors"
    digest = save_checkpoint(path, model.state_dict(), arch, {"note": "x"})
    return model, path, digest


def test_round_trip_is_exact(tmp_path):
    model, path, digest = _saved(tmp_path)
    loaded, arch, sidecar = load_model(path, expect=ARCH)
    assert arch == ARCH and sidecar["sha256"] == digest and sidecar["meta"] == {"note": "x"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_refuses_torch_pickle(tmp_path):
    """The pickle check itself refuses anything but a safetensors file, and it is what refuses
    these in load_model: their sidecars are in order, with the files' true hashes (so that the
    hash check, a later backstop, passes them)."""
    model, safe, _ = _saved(tmp_path / "safe")
    pickled = tmp_path / "pickle.bin"
    torch.save(model.state_dict(), pickled)
    zipped, legacy = pickled.read_bytes(), pickled.with_suffix(".legacy")
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    cases = {"teacher.pt": zipped,  # a pickle by name and content
             "teacher.safetensors": zipped,  # torch's zip pickle, whatever the name says
             "old.safetensors": legacy.read_bytes(),  # a bare pickle (protocol header)
             "renamed.pt": safe.read_bytes(),  # safetensors content, a pickle's name
             "weights.npz": safe.read_bytes()}  # nor anything but .safetensors
    side = json.loads(sidecar_path(safe).read_text())
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        sidecar_path(path).write_text(json.dumps({**side, "sha256": sha256_file(path)}))
        with pytest.raises(CheckpointError, match="refusing to load a pickle"):
            refuse_pickle(path)
        with pytest.raises(CheckpointError, match="refusing to load a pickle"):
            load_model(path)
    refuse_pickle(safe)  # the control: a safetensors file passes


def test_mismatched_teacher_names_the_tensor(tmp_path):
    _, path, _ = _saved(tmp_path)
    side = json.loads(sidecar_path(path).read_text())
    side["architecture"]["classes"] = ["a", "b", "c"]  # sidecar claims 3 classes
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match=r"classifier\.weight: shape \(4, 256\)"):
        load_model(path)


def test_wrong_architecture_is_named(tmp_path):
    _, path, _ = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="'test_resnet' expected"):
        load_model(path, expect=Architecture("test_resnet", ARCH.classes))
    side = json.loads(sidecar_path(path).read_text())
    side["architecture"]["model_name"] = "test_resnet"
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_model(path)


def test_tampered_weights_fail_the_hash(tmp_path):
    _, path, _ = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(path)


def test_missing_sidecar_and_file(tmp_path):
    _, path, _ = _saved(tmp_path)
    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="sidecar"):
        load_model(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "absent.safetensors")


def test_only_safetensors_are_written(tmp_path):
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "x.pt", {}, ARCH)


@pytest.mark.parametrize("sidecar", [
    [1, 2, 3],
    {"sha256": "x"},
    {"architecture": "test_efficientnet"},
    {"architecture": {"model_name": "test_efficientnet"}},
    {"architecture": {"model_name": "test_efficientnet", "classes": [1, 2]}},
    {"architecture": {"model_name": "test_efficientnet", "classes": ["a"], "image_size": "x"}},
])
def test_a_sidecar_without_a_usable_architecture_is_one_clear_error(tmp_path, sidecar):
    """Bad sidecars: a JSON list, no architecture, one without classes — never a traceback."""
    import json

    from moma_core.checkpoint import load_model, read_sidecar, save_checkpoint, sidecar_path
    from moma_core.models import Architecture, build_model

    arch = Architecture("test_efficientnet", ("a", "b"), 32)
    path = tmp_path / "m.safetensors"
    digest = save_checkpoint(path, build_model(arch).state_dict(), arch)
    if isinstance(sidecar, dict):
        sidecar = {"sha256": digest, **sidecar}
    sidecar_path(path).write_text(json.dumps(sidecar))
    for load in (read_sidecar, load_model):
        with pytest.raises(CheckpointError) as err:
            load(path)
        assert "\n" not in str(err.value)
        assert "sidecar" in str(err.value) or "architecture" in str(err.value)
