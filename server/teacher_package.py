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
from moma_protocol import wire as P


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
            P.TEACHER: ArrayRecord({P.TEACHER_FILE: Array(P.bytes_to_array(self.data))}),
            P.TEACHER_META: ConfigRecord({
                "sidecar": json.dumps(self.sidecar),
                **({P.TEACHER_SIGNATURE: json.dumps(self.signature)} if self.signature else {}),
            }),
        }


def package_teacher(path: str | Path) -> TeacherPackage:
    """Load and verify (safetensors only, hash, shapes) the teacher file to ship."""
    path = Path(path)
    _, _, sidecar = load_model(path)  # refuses pickles, checks the hash and tensor shapes
    sig = signature_path(path)
    signature = json.loads(sig.read_text()) if sig.is_file() else None
    return TeacherPackage(path, sidecar["sha256"], sidecar, path.read_bytes(), signature)
