"""moma-server refuses, before anything starts, a federation whose server certificate has
expired and a teacher that is not the one its signature is for: one ``error:`` line, exit 2, no
run folder results. (The same commands in a real multi-host federation:
tests/test_secure_deployment.py.)"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deploy.federation import Federation
from moma_core.checkpoint import sha256_file
from moma_core.signature import sign_teacher
from tests.helpers import IMAGE_SIZE, TARGET_CLASSES, tiny_teacher

HOST, PORT = "10.231.0.2", 9092


def refused(call, fed: Path, teacher: Path, runs: Path, *needles: str, run_config: str = ""
            ) -> None:
    r = call("moma-server", "--federation", fed, "--teacher", teacher, "--name", "x",
             "--runs-dir", runs, "--host", "0.0.0.0", "--port", PORT, "--rounds", 2,
             "--classes", ",".join(TARGET_CLASSES), "--run-config",
             f"image-size={IMAGE_SIZE} {run_config}")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr[-2000:])
    assert not (runs / "x" / "results.json").exists()


def copy_teacher(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True)
    for f in src.parent.glob(src.stem + ".*"):
        shutil.copy(f, dst_dir / f.name)
    return dst_dir / src.name


@pytest.fixture
def fed(tmp_path) -> Federation:
    return Federation.init(tmp_path / "fed", [HOST], PORT, ["site-a"])


@pytest.fixture
def teacher(tmp_path, fed) -> Path:
    path = tiny_teacher(tmp_path / "teachers" / "teacher.safetensors")
    sign_teacher(path, fed.signing_key)
    return path


def test_an_expired_server_certificate(call, tmp_path, teacher):
    expired = Federation.init(tmp_path / "expired", [HOST], PORT, ["site-a"])
    expired.renew_server(days=10, not_before=datetime.now(UTC) - timedelta(days=30))
    refused(call, expired.root, teacher, tmp_path / "runs", "expired on", "renew-server")


def test_a_sidecar_without_a_hash(call, tmp_path, fed, teacher):
    empty = copy_teacher(teacher, tmp_path / "empty")
    side = empty.with_suffix(".json")
    side.write_text(json.dumps({**json.loads(side.read_text()), "sha256": ""}))
    refused(call, fed.root, empty, tmp_path / "runs", "no valid SHA-256")


def test_a_tampered_teacher_with_its_hash_fixed_up(call, tmp_path, fed, teacher):
    tampered = copy_teacher(teacher, tmp_path / "tampered")
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))  # the attacker also fixes up the sidecar's hash
    side = tampered.with_suffix(".json")
    side.write_text(json.dumps({**json.loads(side.read_text()), "sha256": sha256_file(tampered)}))
    refused(call, fed.root, tampered, tmp_path / "runs", "signature is for another teacher")


def test_a_teacher_signed_by_another_federation(call, tmp_path, fed, teacher):
    other = Federation.init(tmp_path / "other", [HOST], PORT, ["site-a"])
    stranger = copy_teacher(teacher, tmp_path / "stranger")
    sign_teacher(stranger, other.signing_key)
    refused(call, fed.root, stranger, tmp_path / "runs", "unknown key")


def test_a_student_that_the_momentum_teacher_cannot_follow(call, tmp_path, fed, teacher):
    refused(call, fed.root, teacher, tmp_path / "runs",
            "cannot distil the teacher test_efficientnet into the student resnet10t",
            'set teacher-update = "frozen" or student-model = "test_efficientnet"',
            run_config='student-model="resnet10t"')


@pytest.mark.parametrize("run_config", ["", 'student-model="resnet10t" teacher-update="frozen"'])
def test_the_signed_teacher_passes_these_checks(call, tmp_path, fed, teacher, monkeypatch,
                                                run_config):
    """The control: the honest teacher and federation get past every check above, and so does
    another student with a frozen teacher (the command is stopped where it would start the
    SuperLink)."""
    from deploy.runtime import free_port
    from server import cli as server_cli

    class Started(Exception):
        pass

    def superlink(*args, **kwargs):
        raise Started

    monkeypatch.setattr(server_cli, "spawn", superlink)
    with pytest.raises(Started):
        call("moma-server", "--federation", fed.root, "--teacher", teacher, "--name", "x",
             "--runs-dir", tmp_path / "runs", "--host", "127.0.0.1", "--port", free_port(),
             "--rounds", 2, "--classes", ",".join(TARGET_CLASSES),
             "--run-config", f"image-size={IMAGE_SIZE} {run_config}")
