"""What a site keeps on its own disk: the teacher cache and the MoMA state between rounds.

``<cache-dir>/teachers/<sha256>.safetensors`` (+ sidecar, + ``.sig.json``): teachers received,
verified by hash and, when the site's kit names the coordinator's teacher-signing key, by its
signature (on receipt and whenever the cache is asked whether it holds a teacher).
``<cache-dir>/runs/<run-name>/``: ``objective.safetensors`` (momentum teacher, key/query
heads, attention, queue and its pointer), ``local.safetensors`` (layers kept local, FedBN) and
``state.json`` (last round trained, teacher hash). None of it is ever sent to the coordinator.
Kept on disk rather than in Flower's ``Context.state``, which does not survive large models in
deployment, nor SuperNode restarts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moma_core.atomic import atomic_write
from moma_core.checkpoint import CheckpointError, load_model, sha256_file
from moma_core.models import Architecture

_SHA = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class TeacherCache:
    """Teachers by SHA-256 in ``<cache-dir>/teachers``; signed by ``signer`` when given."""

    def __init__(self, cache_dir: Path, signer: Path | None = None) -> None:
        self.dir = Path(cache_dir) / "teachers"
        self.signer = signer

    def _verify_signature(self, sha: str, sidecar: dict, signature: dict | None) -> None:
        if self.signer is None:
            return
        from moma_core.signature import SignatureError, verify_teacher

        if not isinstance(signature, dict):
            raise CheckpointError("teacher without the coordinator's signature: refused")
        try:
            verify_teacher(sha, sidecar, signature, Path(self.signer).read_bytes())
        except SignatureError as exc:
            raise CheckpointError(f"teacher signature: {exc}: refused") from None
        except OSError as exc:
            raise CheckpointError(f"teacher-signing key {self.signer} unreadable: {exc}"
                                  ) from None

    def path(self, sha: str) -> Path:
        if not _SHA.match(sha):
            raise CheckpointError(f"not a SHA-256 hex digest: {sha!r}")
        return self.dir / f"{sha}.safetensors"

    def has(self, sha: str) -> bool:
        """Whether the cache holds ``sha``, hash (and signature) checked — once per process
        for an unchanged file."""
        p = self.path(sha)
        try:
            stamp = (str(p), self.signer and str(self.signer), *_stamp(p),
                     *_stamp(p.with_suffix(".json")), *_stamp(self.dir / f"{sha}.sig.json"))
        except OSError:
            return False
        if _VERIFIED.get(stamp) == sha:
            return True
        if self._check(p, sha):
            _VERIFIED[stamp] = sha
            return True
        return False

    def _check(self, p: Path, sha: str) -> bool:
        if not (p.is_file() and p.with_suffix(".json").is_file() and sha256_file(p) == sha):
            return False
        if self.signer is not None:
            sig = self.dir / f"{sha}.sig.json"
            try:
                self._verify_signature(sha, json.loads(p.with_suffix(".json").read_text()),
                                       json.loads(sig.read_text()) if sig.is_file() else None)
            except (CheckpointError, ValueError):
                return False
        return True

    def store(self, data: bytes, sidecar: dict, sha: str, signature: dict | None = None
              ) -> Path:
        """Verify (hash, sidecar, signature) and write a teacher received from the coordinator."""
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise CheckpointError(f"teacher received with SHA-256 {actual[:12]}…, "
                                  f"announced {sha[:12]}…: refused")
        if not isinstance(sidecar, dict) or sidecar.get("sha256") != sha:
            raise CheckpointError("teacher sidecar names another SHA-256: refused")
        self._verify_signature(sha, sidecar, signature)
        path = self.path(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        atomic_write(path.with_suffix(".json"),
                lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2)))
        if signature is not None:
            atomic_write(self.dir / f"{sha}.sig.json",
                    lambda tmp: Path(tmp).write_text(json.dumps(signature, indent=2)))
        return path

    def load(self, sha: str) -> tuple[nn.Module, Architecture]:
        """The teacher (a private copy), loaded and hash-checked once per process."""
        p = self.path(sha)
        key = (str(p), *_stamp(p))
        if key not in _LOADED:
            _LOADED.clear()  # one teacher per run: keep only the latest
            model, arch, _ = load_model(p)
            _LOADED[key] = (model, arch)
        model, arch = _LOADED[key]
        return copy.deepcopy(model), arch


#: In-process memo of verified teachers and the loaded one (a ClientApp process that handles
#: several messages hashes and builds the teacher once); keyed by file stamps.
_VERIFIED: dict[tuple, str] = {}
_LOADED: dict[tuple, tuple[nn.Module, Architecture]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    """(mtime in ns, size) of a file, (0, -1) when it is absent."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0, -1
    return st.st_mtime_ns, st.st_size


class SiteState:
    """The objective's private state and the local layers of one run, on the site's disk."""

    def __init__(self, cache_dir: Path, run_name: str) -> None:
        if not _NAME.match(run_name):
            raise ValueError(f"run name {run_name!r}: use letters, digits, '.', '_', '-'")
        self.dir = Path(cache_dir) / "runs" / run_name

    @property
    def meta_path(self) -> Path:
        return self.dir / "state.json"

    def meta(self) -> dict:
        return json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else {}

    def load(self, teacher_sha: str) -> tuple[dict[str, torch.Tensor] | None,
                                              dict[str, torch.Tensor]]:
        """Objective state and local layers, or (None, {}) for a new run or another teacher."""
        meta = self.meta()
        if meta.get("teacher_sha256") != teacher_sha:
            return None, {}
        obj = self.dir / "objective.safetensors"
        local = self.dir / "local.safetensors"
        return (load_file(str(obj)) if obj.is_file() else None,
                load_file(str(local)) if local.is_file() else {})

    def local_layers(self) -> dict[str, torch.Tensor]:
        """The layers kept local (FedBN) from the last round trained, if any."""
        local = self.dir / "local.safetensors"
        return load_file(str(local)) if local.is_file() else {}

    def save(self, objective_state: dict[str, torch.Tensor], local: dict[str, torch.Tensor],
             meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, tensors in (("objective", objective_state), ("local", local)):
            clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            atomic_write(self.dir / f"{name}.safetensors",
                    lambda tmp, t=clean: save_file(t, str(tmp)))
        atomic_write(self.meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
