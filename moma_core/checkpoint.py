"""Checkpoints: safetensors weights + a JSON sidecar; pickles are refused.

``<name>.safetensors`` holds the tensors; ``<name>.json`` holds the :class:`Architecture`, the
SHA-256 of the weights file and free-form metadata. Loading verifies the hash and, for a model,
that every tensor name and shape matches the architecture the sidecar names. BatchNorm step
counters (``num_batches_tracked``) may be absent: the federation's global checkpoints do not
carry them (only floating-point tensors travel), and the model keeps its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from moma_core.atomic import atomic_write
from moma_core.errors import CheckpointError  # noqa: F401 (re-exported)
from moma_core.models import Architecture, build_model

PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], arch: Architecture,
                    meta: dict | None = None) -> str:
    """Write weights and sidecar atomically; returns the weights' SHA-256."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: weights are written as .safetensors only")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    digest = sha256_file(path)
    sidecar = {"architecture": arch.to_dict(), "sha256": digest, "meta": meta or {}}
    text = json.dumps(sidecar, indent=2)
    atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(text))
    return digest


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of a checkpoint: a JSON object with a usable ``architecture``."""
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(f"{path}: sidecar {side.name} is missing")
    try:
        sidecar = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{side}: not valid JSON ({exc})") from exc
    if not isinstance(sidecar, dict):
        raise CheckpointError(f"{side}: not a sidecar (a JSON object expected)")
    sidecar_architecture(sidecar, side)
    return sidecar


def sidecar_architecture(sidecar: dict, where: str | Path) -> Architecture:
    """The sidecar's architecture, or one clear :class:`CheckpointError`."""
    arch = sidecar.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("model_name"), str) or \
            not isinstance(arch.get("classes"), list) or \
            not all(isinstance(c, str) for c in arch["classes"]) or not arch["classes"]:
        raise CheckpointError(f"{where}: the sidecar has no usable 'architecture' (model_name "
                              "and a list of class names)")
    try:
        return Architecture.from_dict(arch)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the sidecar's architecture is not usable ({exc})"
                              ) from None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Architecture, dict]:
    """Tensors, architecture and sidecar of a checkpoint, after safety and hash checks."""
    path = Path(path)
    refuse_pickle(path)
    sidecar = read_sidecar(path)
    digest = sha256_file(path)
    named = sidecar.get("sha256")
    if not isinstance(named, str) or len(named) != 64:
        raise CheckpointError(f"{sidecar_path(path)}: no valid SHA-256 of the weights; the "
                              "hash check cannot be skipped (re-save the checkpoint)")
    if named != digest:
        raise CheckpointError(
            f"{path}: SHA-256 {digest[:12]}… does not match the sidecar's "
            f"{sidecar['sha256'][:12]}… (weights changed or swapped)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return state, sidecar_architecture(sidecar, sidecar_path(path)), sidecar


def refuse_pickle(path: Path) -> None:
    """Raise for anything that is not a safetensors file (pickles run code when loaded)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    with open(path, "rb") as f:
        head = f.read(8)
    is_pickle = head[:1] == b"\x80" or head[:2] == b"PK"  # pickle protocol / torch zip
    if path.suffix in PICKLE_SUFFIXES or is_pickle or path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: refusing to load a pickle/non-safetensors checkpoint; MoMA-FL loads "
            ".safetensors only (convert with safetensors.torch.save_file)")


#: Buffers a checkpoint may leave out; the model's own are kept (BatchNorm step counters: the
#: federation ships floating-point tensors only, see ``moma_protocol.wire.wire_state``).
OPTIONAL_BUFFERS = frozenset({"num_batches_tracked"})


def is_optional_tensor(key: str) -> bool:
    """Whether a state-dict key names a buffer a checkpoint may leave out."""
    return key.rsplit(".", 1)[-1] in OPTIONAL_BUFFERS


def check_state_matches(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise naming every missing, unexpected or mis-shaped tensor.

    A missing optional buffer (:data:`OPTIONAL_BUFFERS`) is not a problem; one present in the
    file must still have the model's shape.
    """
    expected = model.state_dict()
    problems = []
    for k, v in expected.items():
        if k not in state:
            if not is_optional_tensor(k):
                problems.append(f"missing tensor {k} {tuple(v.shape)}")
        elif tuple(state[k].shape) != tuple(v.shape):
            problems.append(f"tensor {k}: shape {tuple(state[k].shape)} in file, "
                            f"{tuple(v.shape)} expected")
    problems += [f"unexpected tensor {k}" for k in state if k not in expected]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise CheckpointError(f"{what} does not match its architecture: {shown}")


def load_model(path: str | Path, expect: Architecture | None = None
               ) -> tuple[nn.Module, Architecture, dict]:
    """Build the sidecar's architecture and load the weights into it.

    Every tensor of the model must be in the file with its shape, and nothing else, except that
    absent optional buffers (BatchNorm ``num_batches_tracked``) keep the model's own values, so
    every checkpoint the product writes loads — the federation's global ones included. With
    ``expect``, the sidecar must name the same model and classes.
    """
    state, arch, sidecar = load_checkpoint(path)
    if expect is not None:
        if arch.model_name != expect.model_name:
            raise CheckpointError(f"{path}: architecture {arch.model_name!r} in the sidecar, "
                                  f"{expect.model_name!r} expected")
        if arch.classes != expect.classes:
            raise CheckpointError(f"{path}: classes {list(arch.classes)} in the sidecar, "
                                  f"{list(expect.classes)} expected")
    model = build_model(arch)
    check_state_matches(model, state, str(path))
    own = {k: v for k, v in model.state_dict().items() if k not in state}
    model.load_state_dict({**own, **state})  # strict: ``own`` holds only optional buffers
    return model, arch, sidecar
