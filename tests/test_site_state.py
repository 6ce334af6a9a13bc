"""The site's disk: teacher cache verification and MoMA state across rounds."""

import hashlib
import json

import pytest
import torch

from client.site_config import SiteConfigError, site_settings
from client.site_state import SiteState, TeacherCache
from moma_core.checkpoint import CheckpointError, save_checkpoint, sidecar_path
from moma_core.models import Architecture, build_model


def _teacher(tmp_path):
    arch = Architecture("test_efficientnet", ("a", "b"), 32)
    path = tmp_path / "t.safetensors"
    sha = save_checkpoint(path, build_model(arch).state_dict(), arch)
    return path.read_bytes(), json.loads(sidecar_path(path).read_text()), sha


def test_teacher_cache_verifies_and_loads(tmp_path):
    data, sidecar, sha = _teacher(tmp_path)
    cache = TeacherCache(tmp_path / "cache")
    assert not cache.has(sha)
    cache.store(data, sidecar, sha)
    assert cache.has(sha)
    model, arch = cache.load(sha)
    assert arch.classes == ("a", "b") and model.get_classifier().out_features == 2


def test_teacher_cache_refuses_tampering(tmp_path):
    data, sidecar, sha = _teacher(tmp_path)
    cache = TeacherCache(tmp_path / "cache")
    with pytest.raises(CheckpointError, match="refused"):
        cache.store(data[:-1] + bytes([data[-1] ^ 1]), sidecar, sha)
    other = hashlib.sha256(b"x").hexdigest()
    with pytest.raises(CheckpointError, match="refused"):
        cache.store(data, {**sidecar, "sha256": other}, sha)
    with pytest.raises(CheckpointError):
        cache.path("../../etc/passwd")
    cache.store(data, sidecar, sha)
    cache.path(sha).write_bytes(b"corrupted")  # a damaged cache is not trusted
    assert not cache.has(sha)


def test_site_state_persists_per_teacher(tmp_path):
    state = SiteState(tmp_path, "run-1")
    assert state.load("a" * 64) == (None, {})
    obj = {"queue": torch.randn(4, 2), "queue_ptr": torch.tensor([3])}
    state.save(obj, {"bn.running_mean": torch.ones(2)}, {"teacher_sha256": "a" * 64, "round": 2})
    again = SiteState(tmp_path, "run-1")  # a restarted site reads the same files
    loaded, local = again.load("a" * 64)
    assert torch.equal(loaded["queue"], obj["queue"]) and int(loaded["queue_ptr"]) == 3
    assert torch.equal(local["bn.running_mean"], torch.ones(2))
    assert again.load("b" * 64) == (None, {})  # another teacher starts afresh
    with pytest.raises(ValueError):
        SiteState(tmp_path, "../escape")


def test_site_settings_from_node_config(tmp_path):
    s = site_settings({"data-path": "synthetic:target", "cache-dir": str(tmp_path),
                       "site-index": 1, "num-sites": 3, "class-probs": "0.7,0.1,0.1,0.1"})
    assert s.site_index == 1 and s.class_probs == (0.7, 0.1, 0.1, 0.1)
    with pytest.raises(SiteConfigError, match="cache-dir"):
        site_settings({"data-path": "/data"})

