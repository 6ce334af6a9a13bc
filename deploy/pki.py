"""Keys and certificates of a federation: CA, SuperLink certificate, site and signing keys,
operator (TLS client) certificates.

Private keys are written 0600 (created so, never chmod-ed afterwards) and atomically; nothing
existing is overwritten unless asked (``force``). :func:`check_certificate` is what both
commands run at start-up; :func:`operator_name` is how a service of the coordinator (the
dashboard) recognises an operator's client certificate.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The organisational unit every operator certificate carries (and no other certificate).
OPERATOR_OU = "moma-operator"
_OPERATOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CertificateError(ValueError):
    """A certificate is expired, not yet valid or unreadable."""


class ExistsError(ValueError):
    """A key or certificate would be overwritten."""


def write_file(path: Path, data: bytes, mode: int = 0o644, force: bool = False) -> None:
    """Atomic write with ``mode`` from creation; refuses to replace a file unless ``force``."""
    if path.exists() and not force:
        raise ExistsError(f"{path} exists: not overwritten (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _window(days: int, not_before: datetime | None) -> tuple[datetime, datetime]:
    start = not_before or datetime.now(UTC) - timedelta(minutes=5)
    return start, start + timedelta(days=days)


def make_ca(name: str, days: int = 3650, not_before: datetime | None = None
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA")])
    start, end = _window(days, not_before)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    return cert, key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                      hosts: list[str], days: int = 825, not_before: datetime | None = None
                      ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The SuperLink's certificate: SANs for ``hosts`` plus 127.0.0.1 and localhost."""
    key = ec.generate_private_key(ec.SECP384R1())
    names = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    start, end = _window(days, not_before)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    return cert, key


def write_cert(path: Path, cert: x509.Certificate, force: bool = False) -> None:
    write_file(path, _pem_cert(cert), 0o644, force)


def write_private_key(path: Path, key, force: bool = False) -> None:
    write_file(path, _pem_private(key), 0o600, force)


def node_keypair(comment: str) -> tuple[bytes, bytes]:
    """A site's node-authentication key: ECDSA P-384, OpenSSH private and public formats."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def signing_keypair() -> tuple[bytes, bytes]:
    """The coordinator's Ed25519 teacher-signing key (PEM PKCS8, PEM SubjectPublicKeyInfo)."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return _pem_private(key), public


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"certificate {path} is unreadable ({exc})") from None


def load_private_key(path: Path):
    return serialization.load_pem_private_key(Path(path).read_bytes(), None)


def check_certificate(path: Path, now: datetime | None = None, warn_days: int = 30
                      ) -> str | None:
    """Raise :class:`CertificateError` if ``path`` is not valid now; a warning near expiry."""
    cert = load_cert(path)
    now = now or datetime.now(UTC)
    is_ca = False
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        pass
    renew = ("re-provision the federation (moma-deploy init --force) and give every site its "
             "new kit" if is_ca else "renew it with moma-deploy renew-server")
    end, start = cert.not_valid_after_utc, cert.not_valid_before_utc
    if now > end:
        raise CertificateError(f"certificate {path} expired on {end:%Y-%m-%d %H:%M} UTC; "
                               f"{renew}")
    if now < start:
        raise CertificateError(f"certificate {path} is not valid before {start:%Y-%m-%d %H:%M}"
                               " UTC (check this machine's clock)")
    if end - now < timedelta(days=warn_days):
        return f"certificate {path} expires on {end:%Y-%m-%d} UTC; {renew}"
    return None


# -- operator credentials (TLS client certificates) -----------------------------------------------
def issue_operator_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                        name: str, days: int = 825, not_before: datetime | None = None
                        ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An operator's TLS client certificate: CN ``name``, OU ``moma-operator``, client
    authentication only, signed by the federation's CA (ECDSA P-256: every browser takes it)."""
    if not _OPERATOR_NAME.match(name):
        raise ValueError(f"operator name {name!r}: use 1-64 letters, digits, '.', '_', '-' "
                         "(starting with a letter or digit)")
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(days, not_before)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, OPERATOR_OU),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    return cert, key


def operator_pkcs12(name: str, cert: x509.Certificate, key, ca_cert: x509.Certificate
                    ) -> tuple[bytes, str]:
    """The credential as a PKCS#12 file for a browser, and its (random, printed once)
    password. Legacy PBE (3DES, SHA-1 MAC) because some browsers and key stores still refuse
    the AES form."""
    password = secrets.token_urlsafe(12)
    encryption = (serialization.PrivateFormat.PKCS12.encryption_builder()
                  .kdf_rounds(50000)
                  .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
                  .hmac_hash(hashes.SHA1()).build(password.encode()))
    data = pkcs12.serialize_key_and_certificates(name.encode(), key, cert, [ca_cert],
                                                 encryption)
    return data, password


def operator_name(cert: x509.Certificate | bytes, ca: x509.Certificate | Path,
                  now: datetime | None = None) -> str | None:
    """The operator's name if ``cert`` is a valid operator certificate of the CA ``ca``, else
    None. Never raises for a bad certificate.

    ``cert``: the peer's certificate, as a :class:`cryptography.x509.Certificate` or DER bytes
    (what ``ssl.SSLSocket.getpeercert(binary_form=True)`` returns). ``ca``: the federation's CA
    certificate or the path of its PEM file (``FED/coordinator/ca.crt``).

    Valid means: signed directly by ``ca``; valid at ``now`` (default: the current time);
    subject OU ``moma-operator`` and a CN that is a plain name; not a CA; extended key usage
    client authentication. Revocation is the federation's list (``Federation.operator_name``
    checks it as well); a TLS server must still require the certificate (``CERT_REQUIRED``
    with ``ca`` as its only trust anchor) so that the peer has proved it holds the key.
    """
    try:
        if isinstance(cert, bytes | bytearray | memoryview):
            cert = x509.load_der_x509_certificate(bytes(cert))
        ca_cert = ca if isinstance(ca, x509.Certificate) else load_cert(Path(ca))
        cert.verify_directly_issued_by(ca_cert)
        now = now or datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return None
        units = [a.value for a in cert.subject.get_attributes_for_oid(
            NameOID.ORGANIZATIONAL_UNIT_NAME)]
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if units != [OPERATOR_OU] or len(names) != 1:
            return None
        name = str(names[0])
        if not _OPERATOR_NAME.match(name):
            return None
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return None
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            return None
        return name
    except (ValueError, TypeError, x509.ExtensionNotFound, CertificateError):
        return None
    except Exception:  # noqa: BLE001 - a malformed certificate is just not an operator's
        return None
