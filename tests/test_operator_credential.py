"""Who may operate the coordinator.

* The operator credential: ``moma-deploy`` makes a TLS client certificate per operator (at
  ``init``, and ``add-operator``), signed by the federation's CA with OU ``moma-operator``;
  :func:`deploy.pki.operator_name` admits exactly those (the dashboard's check).
* The Control API credential: even from the coordinator host, the gated SuperLink refuses run
  submission and node registration without the secret moma-server writes into its FLWR_HOME;
  the Runtime API (the ServerApp's link) keeps working from loopback.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy import pki
from deploy.federation import Federation, FederationError
from deploy.runtime import flower_env, free_port, stop, wait_for_port

BIN = Path(sys.executable).parent


@pytest.fixture
def fed(tmp_path) -> Federation:
    return Federation.init(tmp_path / "fed", ["127.0.0.1"], 9092, ["site-a"])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the operator credential ----------------------------------------------------------------
def test_init_makes_an_operator_credential_with_its_files_and_modes(tmp_path):
    r = subprocess.run([str(BIN / "moma-deploy"), "init", str(tmp_path / "fed"),
                        "--server-host", "coord.example.org", "--site", "site-a",
                        "--operator", "alice"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    fed = Federation.load(tmp_path / "fed")
    crt, key, p12 = fed.operator_files("alice")
    assert crt == fed.root / "operators" / "alice.crt"
    assert mode(key) == 0o600 and mode(p12) == 0o600 and mode(crt.parent) == 0o700
    password = r.stdout.split("PKCS#12 password (shown once, stored nowhere): ")[1].split()[0]
    # the browser file opens with the printed password and holds the same key and certificate
    loaded = pkcs12.load_pkcs12(p12.read_bytes(), password.encode())
    cert = pki.load_cert(crt)
    assert loaded.cert.certificate == cert
    assert loaded.key.public_key().public_numbers() == \
        pki.load_private_key(key).public_key().public_numbers()
    with pytest.raises(ValueError):  # negative: not without the password
        pkcs12.load_pkcs12(p12.read_bytes(), b"wrong")
    assert pki.operator_name(cert, fed.ca_cert) == "alice"
    assert fed.operator_name(cert.public_bytes(serialization.Encoding.DER)) == "alice"


def test_add_operator_and_revoke_operator(fed):
    r = subprocess.run([str(BIN / "moma-deploy"), "add-operator", str(fed.root), "bob"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    fed = Federation.load(fed.root)
    cert = pki.load_cert(fed.operator_files("bob")[0])
    assert fed.operator_name(cert) == "bob"
    again = subprocess.run([str(BIN / "moma-deploy"), "add-operator", str(fed.root), "bob"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr  # not overwritten
    fed.add_operator("bob", force=True)  # re-issued: the old certificate no longer admits
    assert fed.operator_name(cert) is None
    assert fed.operator_name(pki.load_cert(fed.operator_files("bob")[0])) == "bob"
    fed.revoke_operator("bob")
    assert Federation.load(fed.root).operator_name(
        pki.load_cert(fed.operator_files("bob")[0])) is None
    with pytest.raises(FederationError, match="no operator"):
        fed.revoke_operator("nobody")


def _cert(ca_cert, ca_key, *, ou: str | None = pki.OPERATOR_OU, cn: str = "eve",
          eku=ExtendedKeyUsageOID.CLIENT_AUTH, ca: bool = False, days: int = 30,
          start: datetime | None = None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = ([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)] if ou else []) + \
        [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    start = start or datetime.now(UTC) - timedelta(minutes=5)
    return (x509.CertificateBuilder().subject_name(x509.Name(attrs))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .sign(ca_key, hashes.SHA384()))


def test_operator_name_admits_only_operator_certificates_of_this_ca(fed):
    ca, ca_key = pki.load_cert(fed.ca_cert), pki.load_private_key(fed.ca_key)
    assert pki.operator_name(_cert(ca, ca_key), ca) == "eve"  # the check itself admits
    other_ca, other_key = pki.make_ca("other")
    past = datetime.now(UTC) - timedelta(days=60)
    refused = {
        "another CA": _cert(other_ca, other_key),
        "no operator OU": _cert(ca, ca_key, ou=None),
        "another OU": _cert(ca, ca_key, ou="moma-site"),
        "server usage": _cert(ca, ca_key, eku=ExtendedKeyUsageOID.SERVER_AUTH),
        "a CA": _cert(ca, ca_key, ca=True),
        "expired": _cert(ca, ca_key, start=past),
        "not a plain name": _cert(ca, ca_key, cn="eve; rm -rf"),
        "the server certificate": pki.load_cert(fed.server_cert),
    }
    for why, cert in refused.items():
        assert pki.operator_name(cert, ca) is None, why
        assert pki.operator_name(cert.public_bytes(serialization.Encoding.DER), ca) is None, why
    assert pki.operator_name(b"not a certificate", ca) is None
    # an operator made by add-operator but not in this federation's list is refused there
    assert fed.operator_name(_cert(ca, ca_key)) is None


# -- the Control API credential -------------------------------------------------------------
@pytest.fixture
def superlink(tmp_path):
    """A real gated SuperLink (plaintext, loopback) started as moma-server starts it, with
    the Control API credential in ``home``; yields (port, home, env, log path)."""
    from server.cli import superlink_env, write_cli_config

    port = free_port()
    home = tmp_path / "flwr-home"
    token_file = write_cli_config(home, "127.0.0.1", port, None)
    env = flower_env(home)
    log = tmp_path / "superlink.log"
    cmd = [sys.executable, "-m", "deploy.superlink", "--insecure", "--host", "127.0.0.1",
           "--port", str(port), "--database", str(tmp_path / "superlink.db"),
           "--disable-runtime-dependency-installation"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=superlink_env(env, token_file, None, tmp_path),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, 300, proc)
        yield port, home, env, log
    finally:
        stop(proc)


@pytest.mark.timeout(900)
def test_the_control_api_needs_the_credential_even_from_this_host(superlink, tmp_path):
    import httpx

    port, home, env, log = superlink
    token = (home / "control.token").read_text().strip()
    assert mode(home / "control.token") == 0o600 and mode(home) == 0o700
    assert mode(home / "credentials.yaml") == 0o600
    # moma-server's own flwr CLI (its FLWR_HOME) gets through
    ok = subprocess.run([str(BIN / "flwr"), "ls", "moma", "--format", "json"], env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and json.loads(ok.stdout)["runs"] == [], ok.stdout + ok.stderr
    # another local user's flwr CLI: same address, no credential
    other = tmp_path / "other-home"
    other.mkdir()
    (other / "config.toml").write_text((home / "config.toml").read_text())
    foreign = subprocess.run([str(BIN / "flwr"), "ls", "moma", "--format", "json"],
                             env={**env, "FLWR_HOME": str(other)}, capture_output=True,
                             text=True, timeout=300)
    answer = json.loads(foreign.stdout)  # (flwr ls --format json exits 0 on errors)
    assert answer.get("success") is False and "runs" not in answer, answer
    assert "credential" in answer.get("error-message", ""), answer
    base = f"http://127.0.0.1:{port}"
    headers = {"content-type": "application/protobuf"}
    for auth in (None, "Bearer wrong", f"Bearer {token}x", token):
        h = headers if auth is None else {**headers, "authorization": auth}
        r = httpx.post(f"{base}/v1/control/start-run", content=b"", headers=h, timeout=60)
        assert r.status_code == 403 and "credential" in r.json()["detail"], (auth, r.text)
        r = httpx.post(f"{base}/v1/fleet/../control/list-runs", content=b"", headers=h,
                       timeout=60)
        assert r.status_code in (403, 404), (auth, r.status_code)
    # the right one passes the gate (Flower then answers the empty request itself)
    r = httpx.post(f"{base}/v1/control/list-runs", content=b"",
                   headers={**headers, "authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code != 403, r.text
    # the Runtime API from loopback is not the gate's to refuse
    r = httpx.post(f"{base}/v1/runtime/get-nodes", content=b"", headers=headers, timeout=60)
    assert r.status_code != 403 or "credential" not in r.text, r.text
    deadline = time.monotonic() + 60
    while "no valid Control API credential" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)
    # the secret is not handed on to what the SuperLink starts
    assert "MOMA_CONTROL_TOKEN_FILE" not in os.environ


def test_without_a_credential_file_the_control_api_is_closed(monkeypatch, tmp_path):
    from deploy import superlink

    monkeypatch.delenv(superlink.CONTROL_TOKEN_ENV, raising=False)
    assert superlink.gate_settings(str(tmp_path / "s.db"))["control_token"] is None
    token = tmp_path / "t"
    token.write_text("s3cret\n")
    monkeypatch.setenv(superlink.CONTROL_TOKEN_ENV, str(token))
    settings = superlink.gate_settings(str(tmp_path / "s.db"))
    assert settings["control_token"] == "s3cret"
    assert settings["events_dir"] == tmp_path.resolve()
    assert superlink.CONTROL_TOKEN_ENV not in os.environ  # removed for Flower's children
