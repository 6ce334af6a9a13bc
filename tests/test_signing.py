"""Signed teachers: signing, verification, and every way a site must refuse a teacher."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.site_state import TeacherCache
from moma_core.checkpoint import CheckpointError, load_checkpoint, read_sidecar, sha256_file
from moma_core.signature import (
    SignatureError,
    sign_teacher,
    signature_path,
    verify_teacher,
    verify_teacher_files,
)
from tests.helpers import tiny_teacher


def keypair(folder: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    priv, pub = folder / f"{name}.key", folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture
def signed(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    priv, pub = keypair(tmp_path, "coordinator")
    sig = sign_teacher(teacher, priv)
    return teacher, pub, sig


def parts(teacher: Path, sig: Path) -> tuple[str, dict, dict]:
    return sha256_file(teacher), read_sidecar(teacher), json.loads(sig.read_text())


def test_signed_teacher_verifies(signed):
    teacher, pub, sig = signed
    assert sig == signature_path(teacher) and sig.name == "teacher.sig.json"
    verify_teacher_files(teacher, pub)
    verify_teacher(*parts(teacher, sig), pub.read_bytes())


def test_tampered_weights_are_refused(signed):
    teacher, pub, sig = signed
    data = bytearray(teacher.read_bytes())
    data[-1] ^= 1
    teacher.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="sidecar names another"):
        verify_teacher_files(teacher, pub)


def test_swapped_or_edited_sidecar_is_refused(signed, tmp_path):
    teacher, pub, sig = signed
    sha, sidecar, signature = parts(teacher, sig)
    edited = {**sidecar, "meta": {"purpose": "something else"}}
    with pytest.raises(SignatureError, match="sidecar was changed"):
        verify_teacher(sha, edited, signature, pub.read_bytes())
    other = tiny_teacher(tmp_path / "other" / "t.safetensors", classes=("a", "b"))
    with pytest.raises(SignatureError):  # another teacher's sidecar and weights
        verify_teacher(sha256_file(other), read_sidecar(other), signature, pub.read_bytes())


def test_empty_hash_is_refused_everywhere(signed):
    teacher, pub, sig = signed
    sha, sidecar, signature = parts(teacher, sig)
    with pytest.raises(SignatureError, match="empty or malformed"):
        verify_teacher("", {**sidecar, "sha256": ""}, signature, pub.read_bytes())
    side = teacher.with_suffix(".json")
    side.write_text(json.dumps({**sidecar, "sha256": ""}))
    with pytest.raises(CheckpointError, match="no valid SHA-256"):
        load_checkpoint(teacher)
    side.write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="not a sidecar"):
        load_checkpoint(teacher)


def test_unknown_signer_and_forged_signature_are_refused(signed, tmp_path):
    teacher, pub, sig = signed
    sha, sidecar, signature = parts(teacher, sig)
    _, stranger = keypair(tmp_path, "stranger")
    with pytest.raises(SignatureError, match="unknown key"):
        verify_teacher(sha, sidecar, signature, stranger.read_bytes())
    forged = {**signature, "signature": base64.b64encode(b"\0" * 64).decode()}
    with pytest.raises(SignatureError, match="does not verify"):
        verify_teacher(sha, sidecar, forged, pub.read_bytes())
    # a stranger signs and claims the coordinator's fingerprint
    priv2, _ = keypair(tmp_path, "mallory")
    t2 = tiny_teacher(tmp_path / "m" / "teacher.safetensors")
    mallory = json.loads(sign_teacher(t2, priv2).read_text())
    mallory["signer"] = signature["signer"]
    with pytest.raises(SignatureError, match="does not verify"):
        verify_teacher(sha256_file(t2), read_sidecar(t2), mallory, pub.read_bytes())


@pytest.mark.parametrize("bad", [None, {}, {"format": "x"}, [], "text"])
def test_malformed_signature_is_refused(signed, bad):
    teacher, pub, sig = signed
    sha, sidecar, _ = parts(teacher, sig)
    with pytest.raises(SignatureError):
        verify_teacher(sha, sidecar, bad, pub.read_bytes())


def test_site_cache_requires_the_coordinators_signature(signed, tmp_path):
    teacher, pub, sig = signed
    sha, sidecar, signature = parts(teacher, sig)
    blob = teacher.read_bytes()
    cache = TeacherCache(tmp_path / "site", signer=pub)
    with pytest.raises(CheckpointError, match="without the coordinator's signature"):
        cache.store(blob, sidecar, sha, None)
    with pytest.raises(CheckpointError, match="signature"):
        cache.store(blob, {**sidecar, "meta": {}}, sha, signature)
    assert not cache.has(sha)
    cache.store(blob, sidecar, sha, signature)
    assert cache.has(sha)
    # a cached teacher whose signature file was replaced no longer counts as present
    (cache.dir / f"{sha}.sig.json").write_text(json.dumps({**signature, "signer": "0" * 64}))
    assert not cache.has(sha)
    # an unsigned teacher cached by a trial without a kit is not trusted by a kit site
    unsigned = TeacherCache(tmp_path / "site2")
    unsigned.store(blob, sidecar, sha)
    assert unsigned.has(sha) and not TeacherCache(tmp_path / "site2", signer=pub).has(sha)


def test_sign_command(call, tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    priv, pub = keypair(tmp_path, "k")
    ok = call("moma-teacher", "sign", teacher, "--key", priv)
    assert ok.returncode == 0, ok.stderr
    verify_teacher_files(teacher, pub)
    bad = call("moma-teacher", "sign", teacher, "--key", pub)
    assert bad.returncode == 2 and bad.stderr.startswith("error:"), bad.stderr
    assert "Traceback" not in bad.stderr
    teacher.with_suffix(".json").write_text(json.dumps({**read_sidecar(teacher), "sha256": ""}))
    empty = call("moma-teacher", "sign", teacher, "--key", priv)
    assert empty.returncode == 2 and "SHA-256" in empty.stderr


# -- signing is an explicit act: moma-teacher sign shows what it signs, moma-server never signs --
def _federation(tmp_path: Path):
    from deploy.federation import Federation

    return Federation.init(tmp_path / "fed", ["127.0.0.1"], 9092, ["site-a"])


def _serve(call, fed, teacher: Path, tmp_path: Path):
    """``moma-server --federation`` on ``teacher`` (a student the teacher fits)."""
    from deploy.runtime import free_port
    from tests.helpers import TARGET_CLASSES

    return call("moma-server", "--federation", fed.root, "--teacher", teacher, "--name", "x",
                "--runs-dir", tmp_path / "runs", "--host", "127.0.0.1", "--port", free_port(),
                "--rounds", 2, "--classes", ",".join(TARGET_CLASSES),
                "--run-config", 'student-model="test_efficientnet"')


class Started(Exception):
    """moma-server got past its checks: it would start the SuperLink now."""


@pytest.fixture
def no_superlink(monkeypatch):
    from server import cli as server_cli

    def spawn(*args, **kwargs):
        raise Started

    monkeypatch.setattr(server_cli, "spawn", spawn)


def test_moma_server_refuses_an_unsigned_teacher_and_never_signs_it(call, tmp_path,
                                                                    no_superlink):
    """The issue: a tampered teacher whose signature file was deleted was signed by
    ``moma-server --federation`` with the federation's key, and the sites trained on it."""
    fed = _federation(tmp_path)
    teacher = tiny_teacher(tmp_path / "teachers" / "teacher.safetensors")
    sign_teacher(teacher, fed.signing_key)  # the teacher someone approved
    data = bytearray(teacher.read_bytes())
    data[-1] ^= 1
    teacher.write_bytes(bytes(data))  # tampered, its hash fixed up, its signature deleted
    side = teacher.with_suffix(".json")
    side.write_text(json.dumps({**json.loads(side.read_text()), "sha256": sha256_file(teacher)}))
    signature_path(teacher).unlink()

    r = _serve(call, fed, teacher, tmp_path)  # a Started here fails the test
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "is not signed" in errors[0]
    assert f"moma-teacher sign {teacher.resolve()} --key {fed.signing_key}" in errors[0]
    assert not signature_path(teacher).exists()  # nothing was signed
    assert "teacher-signing key" not in r.stdout + r.stderr


def test_a_teacher_signed_with_moma_teacher_sign_is_accepted(call, tmp_path, no_superlink):
    fed = _federation(tmp_path)
    teacher = tiny_teacher(tmp_path / "teachers" / "teacher.safetensors")
    assert call("moma-teacher", "sign", teacher, "--key", fed.signing_key).returncode == 0
    with pytest.raises(Started):
        _serve(call, fed, teacher, tmp_path)


def test_sign_command_shows_the_hash_architecture_and_classes_it_signs(call, tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    priv, _ = keypair(tmp_path, "k")
    r = call("moma-teacher", "sign", teacher, "--key", priv)
    assert r.returncode == 0, r.stderr
    shown = " ".join((r.stdout + r.stderr).split())
    sidecar = read_sidecar(teacher)
    arch = sidecar["architecture"]
    assert sidecar["sha256"] in shown  # the whole hash, to compare with the approved one
    assert arch["model_name"] in shown and f"{arch['image_size']} px" in shown
    assert ",".join(arch["classes"]) in shown
    assert shown.index(sidecar["sha256"]) < shown.index("teacher.sig.json")  # shown first
