"""moma-deploy: files, modes, certificates, keys Flower accepts, refusals."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from deploy import pki
from deploy.federation import Federation, FederationError, SiteKit

BIN = Path(sys.executable).parent


@pytest.fixture
def fed(tmp_path) -> Federation:
    return Federation.init(tmp_path / "fed", ["coord.example.org", "10.0.0.5"], 9092,
                           ["hospital-a", "hospital-b"])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_every_file_with_private_keys_0600(fed):
    root = fed.root
    for key in (root / "ca" / "ca.key", fed.server_key, fed.signing_key,
                root / "sites" / "hospital-a" / "node.key"):
        assert mode(key) == 0o600, key
    assert mode(root / "ca") == 0o700 and mode(root / "coordinator") == 0o700
    for name in ("hospital-a", "hospital-b"):
        kit = SiteKit.load(root / "sites" / name)
        assert kit.site_name == name and kit.server == "coord.example.org:9092"
        assert kit.ca_cert.read_bytes() == fed.ca_cert.read_bytes()
        assert kit.teacher_signer.read_bytes() == fed.signing_public_key.read_bytes()
    assert set(fed.active_sites()) == {"hospital-a", "hospital-b"}


def test_server_certificate_is_signed_by_the_ca_with_the_sans(fed):
    ca = pki.load_cert(fed.ca_cert)
    cert = pki.load_cert(fed.server_cert)
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} == {"10.0.0.5",
                                                                           "127.0.0.1"}
    other, _ = pki.make_ca("other")
    with pytest.raises((ValueError, TypeError)):  # negative: another CA did not sign it
        cert.verify_directly_issued_by(other)


def test_node_key_is_what_flower_loads(fed):
    from flwr.cli.supernode.register import try_load_public_key

    kit = fed.kit("hospital-a")
    private = load_ssh_private_key((kit / "node.key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    public = load_ssh_public_key((kit / "node.pub").read_bytes())
    assert public.public_numbers() == private.public_key().public_numbers()
    assert try_load_public_key(kit / "node.pub")
    assert fed.active_sites()["hospital-a"].split()[:2] == \
        (kit / "node.pub").read_text().split()[:2]


def test_nothing_is_overwritten_without_force(fed, tmp_path):
    before = {p: p.read_bytes() for p in fed.root.rglob("*") if p.is_file()}
    with pytest.raises(pki.ExistsError, match="exists"):
        Federation.init(fed.root, ["x"], 9092, ["hospital-a"])
    assert {p: p.read_bytes() for p in fed.root.rglob("*") if p.is_file()} == before
    with pytest.raises(FederationError, match="already registered"):
        fed.add_site("hospital-a")
    Federation.init(fed.root, ["x"], 9092, ["hospital-a"], force=True)
    assert fed.server_key.read_bytes() != before[fed.server_key]


def test_add_revoke_and_bad_names(fed):
    fed.add_site("hospital-c")
    again = Federation.load(fed.root)
    assert "hospital-c" in again.active_sites()
    again.revoke_site("hospital-b")
    again = Federation.load(fed.root)
    assert "hospital-b" in again.revoked_sites() and "hospital-b" not in again.active_sites()
    with pytest.raises(FederationError, match="already revoked"):
        again.add_site("hospital-b")
    with pytest.raises(FederationError, match="no site"):
        again.revoke_site("nobody")
    for bad in ("../x", "a b", "", "-x", "x" * 65, "/etc"):
        with pytest.raises(FederationError, match="site name"):
            again.add_site(bad)


def test_certificate_validity_checks(fed, tmp_path):
    assert pki.check_certificate(fed.server_cert) is None
    ca, ca_key = pki.load_cert(fed.ca_cert), pki.load_private_key(fed.ca_key)
    old = datetime.now(UTC) - timedelta(days=30)
    expired, _ = pki.issue_server_cert(ca, ca_key, ["h"], days=10, not_before=old)
    pki.write_cert(tmp_path / "expired.crt", expired)
    with pytest.raises(pki.CertificateError, match="expired on .*renew-server"):
        pki.check_certificate(tmp_path / "expired.crt")
    future, _ = pki.issue_server_cert(ca, ca_key, ["h"], days=10,
                                      not_before=datetime.now(UTC) + timedelta(days=2))
    pki.write_cert(tmp_path / "future.crt", future)
    with pytest.raises(pki.CertificateError, match="not valid before"):
        pki.check_certificate(tmp_path / "future.crt")
    soon, _ = pki.issue_server_cert(ca, ca_key, ["h"], days=35, not_before=old)
    pki.write_cert(tmp_path / "soon.crt", soon)
    assert "expires on" in pki.check_certificate(tmp_path / "soon.crt")
    (tmp_path / "junk.crt").write_text("junk")
    with pytest.raises(pki.CertificateError, match="unreadable"):
        pki.check_certificate(tmp_path / "junk.crt")


def test_kit_refuses_a_readable_key_and_missing_files(fed):
    kit = fed.kit("hospital-a")
    (kit / "node.key").chmod(0o644)
    with pytest.raises(FederationError, match="chmod 600"):
        SiteKit.load(kit)
    (kit / "node.key").chmod(0o600)
    (kit / "coordinator.pub").unlink()
    with pytest.raises(FederationError, match="missing"):
        SiteKit.load(kit)
    with pytest.raises(FederationError, match="not a site kit"):
        SiteKit.load(fed.root)


def test_corrupt_federation_file(fed):
    (fed.root / "federation.json").write_text(json.dumps({"sites": []}))
    with pytest.raises(FederationError, match="corrupt"):
        Federation.load(fed.root)


def test_command_line(tmp_path):
    cmd = str(BIN / "moma-deploy")
    ok = subprocess.run([cmd, "init", str(tmp_path / "f"), "--server-host", "127.0.0.1",
                         "--site", "a"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "f" / "sites" / "a" / "site.toml").is_file()
    for bad in (["init", str(tmp_path / "f"), "--server-host", "h"],
                ["init", str(tmp_path / "g"), "--site", "a"],
                ["revoke-site", str(tmp_path / "f"), "nobody"],
                ["add-site", str(tmp_path / "nowhere"), "b"],
                ["add-site", str(tmp_path / "f"), "bad name"]):
        out = subprocess.run([cmd, *bad], capture_output=True, text=True)
        assert out.returncode == 2, (bad, out.stderr)
        assert out.stderr.startswith("error:") and "Traceback" not in out.stderr
    listing = subprocess.run([cmd, "list", str(tmp_path / "f")], capture_output=True,
                             text=True)
    assert listing.returncode == 0 and "a\tactive\tSHA256:" in listing.stdout


def test_operator_certificate_is_a_client_certificate_of_the_ca(fed):
    ca = pki.load_cert(fed.ca_cert)
    cert, key = pki.issue_operator_cert(ca, pki.load_private_key(fed.ca_key), "alice")
    cert.verify_directly_issued_by(ca)
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == \
        "moma-operator"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert pki.operator_name(cert, ca) == "alice"
    assert pki.operator_name(cert, fed.ca_cert) == "alice"  # the CA's file works as well
    # negative: the server certificate and a CA of another federation
    assert pki.operator_name(pki.load_cert(fed.server_cert), ca) is None
    assert pki.operator_name(cert, pki.make_ca("other")[0]) is None
    with pytest.raises(ValueError, match="operator name"):
        pki.issue_operator_cert(ca, pki.load_private_key(fed.ca_key), "bad name")


def test_command_line_operators(tmp_path):
    cmd = str(BIN / "moma-deploy")
    ok = subprocess.run([cmd, "init", str(tmp_path / "f"), "--server-host", "127.0.0.1",
                         "--site", "a"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "PKCS#12 password" in ok.stdout
    assert mode(tmp_path / "f" / "operators" / "operator.key") == 0o600
    for bad in (["add-operator", str(tmp_path / "f"), "operator"],  # exists
                ["add-operator", str(tmp_path / "f"), "bad name"],
                ["revoke-operator", str(tmp_path / "f"), "nobody"]):
        out = subprocess.run([cmd, *bad], capture_output=True, text=True)
        assert out.returncode == 2, (bad, out.stderr)
        assert out.stderr.startswith("error:") and "Traceback" not in out.stderr
    listing = subprocess.run([cmd, "list", str(tmp_path / "f")], capture_output=True,
                             text=True)
    assert "operator operator\tactive" in listing.stdout
