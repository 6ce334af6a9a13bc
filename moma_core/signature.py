"""Signed teachers: the coordinator's Ed25519 signature over a teacher's hash and sidecar.

``<stem>.sig.json`` beside ``<stem>.safetensors``::

    {"format": "moma-fl-teacher-signature/1", "sha256": <weights>, "sidecar_sha256": <sidecar>,
     "signer": <sha256 of the raw public key>, "signature": <base64 Ed25519 signature>}

The signed message is ``b"moma-fl teacher v1\\n" + sha256 + b"\\n" + sidecar_sha256`` where the
sidecar hash is taken over its canonical JSON (sorted keys, no spaces). A site verifies with the
coordinator's public key from its kit; :func:`verify_teacher` takes data, not paths, because the
site receives bytes over the network.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from moma_core.checkpoint import read_sidecar, sha256_file

FORMAT = "moma-fl-teacher-signature/1"
_SHA = re.compile(r"^[0-9a-f]{64}$")


class SignatureError(ValueError):
    """A teacher's signature is missing, malformed or does not verify."""


def signature_path(weights: str | Path) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.stem + ".sig.json")


def sidecar_digest(sidecar: dict) -> str:
    canonical = json.dumps(sidecar, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def fingerprint(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _message(sha: str, sidecar_sha: str) -> bytes:
    return b"moma-fl teacher v1\n" + sha.encode() + b"\n" + sidecar_sha.encode()


def _load_public(pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise SignatureError(f"the teacher-signing public key is unreadable ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("the teacher-signing public key is not an Ed25519 key")
    return key


def load_signing_key(private_key: str | Path) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 teacher-signing key, or one :class:`SignatureError`."""
    try:
        key = serialization.load_pem_private_key(Path(private_key).read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{private_key}: not a readable private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{private_key}: not an Ed25519 key")
    return key


def sign_teacher(weights: Path, private_key: Path) -> Path:
    """Sign ``weights`` (its hash must match its sidecar) and write ``<stem>.sig.json``."""
    weights = Path(weights)
    sidecar = read_sidecar(weights)
    sha = sha256_file(weights)
    if not _SHA.match(str(sidecar.get("sha256", ""))) or sidecar["sha256"] != sha:
        raise SignatureError(f"{weights}: its sidecar does not name its SHA-256; refusing to "
                             "sign (re-save the teacher)")
    key = load_signing_key(private_key)
    side = sidecar_digest(sidecar)
    doc = {"format": FORMAT, "sha256": sha, "sidecar_sha256": side,
           "signer": fingerprint(key.public_key()),
           "signature": base64.b64encode(key.sign(_message(sha, side))).decode()}
    out = signature_path(weights)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    return out


def verify_teacher(weights_sha256: str, sidecar: dict, signature: dict,
                   signer_public_key_pem: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` signs this hash and this sidecar."""
    if not isinstance(weights_sha256, str) or not _SHA.match(weights_sha256):
        raise SignatureError("the teacher's SHA-256 is empty or malformed")
    if not isinstance(sidecar, dict) or sidecar.get("sha256") != weights_sha256:
        raise SignatureError("the teacher's sidecar names another SHA-256")
    if not isinstance(signature, dict) or signature.get("format") != FORMAT:
        raise SignatureError("the signature file is malformed")
    if signature.get("sha256") != weights_sha256:
        raise SignatureError("the signature is for another teacher")
    if signature.get("sidecar_sha256") != sidecar_digest(sidecar):
        raise SignatureError("the sidecar was changed after signing")
    key = _load_public(signer_public_key_pem)
    if signature.get("signer") != fingerprint(key):
        raise SignatureError("signed by an unknown key (not the coordinator's)")
    try:
        raw = base64.b64decode(str(signature.get("signature", "")), validate=True)
        key.verify(raw, _message(weights_sha256, signature["sidecar_sha256"]))
    except (InvalidSignature, binascii.Error, ValueError):
        raise SignatureError("the signature does not verify") from None


def verify_teacher_files(weights: Path, public_key: Path) -> None:
    """:func:`verify_teacher` for a teacher on disk, its sidecar and ``<stem>.sig.json``."""
    sig = signature_path(weights)
    if not sig.is_file():
        raise SignatureError(f"{weights}: no signature ({sig.name}); sign it with "
                             "moma-teacher sign")
    try:
        signature = json.loads(sig.read_text())
    except json.JSONDecodeError:
        raise SignatureError(f"{sig}: not JSON") from None
    verify_teacher(sha256_file(weights), read_sidecar(weights), signature,
                   Path(public_key).read_bytes())
