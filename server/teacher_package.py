"""The teacher as shipped: its safetensors bytes, sidecar, SHA-256 and (when signed) the
coordinator's signature, checked before sending."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord

from moma_core.checkpoint import load_model
from moma_core.models import Architecture
from moma_core.signature import signature_path
from moma_protocol import wire
from moma_protocol.settings import ConfigError, RunConfig


@dataclass(frozen=True)
class TeacherPackage:
    path: Path
    sha256: str
    sidecar: dict
    data: bytes
    signature: dict | None = None

    @property
    def architecture(self) -> Architecture:
        return Architecture.from_dict(self.sidecar["architecture"])

    def records(self) -> dict:
        """The two records that carry the teacher to a site."""
        return {
            wire.TEACHER: ArrayRecord({wire.TEACHER_FILE: Array(wire.bytes_to_array(self.data))}),
            wire.TEACHER_META: ConfigRecord({
                "sidecar": json.dumps(self.sidecar),
                **({wire.TEACHER_SIGNATURE: json.dumps(self.signature)} if self.signature else {}),
            }),
        }


def package_teacher(path: str | Path) -> TeacherPackage:
    """Load and verify (safetensors only, hash, shapes) the teacher file to ship."""
    path = Path(path)
    _, _, sidecar = load_model(path)  # refuses pickles, checks the hash and tensor shapes
    sig = signature_path(path)
    signature = json.loads(sig.read_text()) if sig.is_file() else None
    return TeacherPackage(path, sidecar["sha256"], sidecar, path.read_bytes(), signature)


def check_student_model(run: RunConfig) -> None:
    """Refuse a ``student-model`` that timm cannot build or that cannot take the run's
    ``image-size`` (the sites would fail every round)."""
    import timm

    from moma_core.models import check_input_size

    name = run.federation.student_model
    if not timm.is_model(name):
        raise ConfigError(f"run-config student-model: {name!r} is not a timm model name "
                          "(see timm.list_models())")
    try:
        check_input_size(name, run.federation.image_size)
    except ValueError as exc:
        raise ConfigError(f"run-config student-model/image-size: {exc}") from None


def check_student_fits(run: RunConfig, teacher: Architecture) -> None:
    """Refuse, before a run starts, a student the objective cannot pair with this teacher.

    The sites would otherwise fail every round with the same error. The check is the one the
    sites' objective runs (:func:`moma_core.objectives.check_teacher_fits`), on untrained models
    of the two architectures.
    """
    from moma_core.models import build_model
    from moma_core.objectives import check_teacher_fits

    check_student_model(run)
    cfg = run.objective_config()
    if cfg.kind not in ("moma", "crckd"):
        return  # CE, KD and dp-moma (frozen teacher) take any teacher
    student = run.student_architecture()
    try:
        check_teacher_fits(cfg, build_model(teacher), build_model(student))
    except ValueError as exc:
        reason = str(exc).split("; use ")[0]  # the fix is named below in run-config terms
        fixes = [f'student-model = "{teacher.model_name}"']
        if cfg.kind == "moma":
            fixes.insert(0, 'teacher-update = "frozen"')
        raise ConfigError(
            f"objective {cfg.kind} cannot distil the teacher {teacher.model_name} into the "
            f"student {student.model_name}: {reason}; set {' or '.join(fixes)}") from None
