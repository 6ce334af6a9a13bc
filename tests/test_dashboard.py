"""The dashboard (server/dashboard): what it reads from a run folder, its HTTP endpoints, the
loopback-only default and the operator-certificate gate of a remote dashboard. The page itself,
in Chromium: tests/test_dashboard_browser.py."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.dashboard import Dashboard, DashboardError, run_state
from server.dashboard import data as dash_data
from server.dashboard.auth import host_header_ok, is_loopback

BIN = Path(sys.executable).parent


def _site(name: str, status: str = "ok", reason: str | None = None, eps: float | None = None,
          acc: float = 0.5) -> dict:
    metrics = {"train-ce": 1.0, "train-kl": 0.1}
    if eps is not None:
        metrics["dp-epsilon"] = eps
    return {"site_name": name, "status": status, "reason": reason, "bytes_down": 1000,
            "bytes_up": 500, "metrics": metrics,
            "incoming_eval": {"accuracy": acc, "macro-f1": acc, "kappa": acc}}


def _results(teacher_path: str = "") -> dict:
    sites1 = {"11": _site("alpha", eps=1.5), "18446744073709551615": _site("beta")}
    sites2 = {"11": _site("alpha", eps=2.5),
              "18446744073709551615": _site("beta", "failed", "out-of-memory")}
    return {"schema_version": 2, "teacher_sha256": "cd" * 32, "started": 1.0,
            "config": {"objective": "moma", "num-rounds": 4, "classes": "a,b,c,d",
                       "teacher-path": teacher_path, "output-dir": "/secret/path"},
            "rounds": [
                {"round": 1, "status": "ok", "train": {"train-ce": 1.2, "train-nce": float(4)},
                 "sites": sites1, "bytes_down": 2000, "bytes_up": 1000, "wall_s": 3.0,
                 "server_eval": {"accuracy": 0.4, "macro_f1": 0.3, "kappa": 0.2},
                 "federated_eval": {"accuracy": 0.45, "macro_f1": 0.4, "kappa": 0.3},
                 "federated_eval_sites": {
                     "11": {"accuracy": 0.5, "macro-f1": 0.4, "kappa": 0.3, "site-name": "alpha"},
                     "18446744073709551615": {"accuracy": 0.6, "macro-f1": 0.5, "kappa": 0.4,
                                              "site-name": "beta"}}},
                {"round": 2, "status": "ok", "train": {"train-ce": 1.0}, "sites": sites2,
                 "bytes_down": 2000, "bytes_up": 1000, "wall_s": 2.0,
                 "server_eval": {"accuracy": 0.55, "macro_f1": 0.5, "kappa": 0.45}}],
            "final": None}


def _superlink_db(path: Path, rows: list[tuple]) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE node (node_id BIGINT, owner_aid VARCHAR, owner_name VARCHAR, "
                "status VARCHAR, registered_at VARCHAR, last_activated_at VARCHAR, "
                "last_deactivated_at VARCHAR, unregistered_at VARCHAR, online_until FLOAT, "
                "heartbeat_interval FLOAT, public_key BLOB)")
    con.executemany("INSERT INTO node (node_id, status, last_activated_at, last_deactivated_at, "
                    "online_until, heartbeat_interval) VALUES (?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    from deploy.federation import Federation

    root = tmp_path_factory.mktemp("fed") / "federation"
    hosts = [_external_ip() or "dashboard.example.org"]
    fed = Federation.init(root, hosts, 9092, ["alpha", "beta", "gamma"])
    fed.revoke_site("gamma")
    return root


def _run(tmp_path: Path, federation: Path | None = None) -> Path:
    folder = tmp_path / "runs" / "trial"
    folder.mkdir(parents=True)
    teacher = tmp_path / "teacher.safetensors"
    (tmp_path / "teacher.sig.json").write_text(json.dumps(
        {"format": "moma-fl-teacher-signature/1", "sha256": "cd" * 32, "signer": "ef" * 32}))
    (folder / "results.json").write_text(json.dumps(_results(str(teacher))))
    return folder


def test_run_state_reads_what_the_run_folder_holds(tmp_path, federation):
    """results.json → per-round metrics, loss terms, bytes, per-site series, ε, failures by
    category; live.json → the round in progress; security.jsonl → events; the SuperLink's node
    table → online / last seen (signed node ids mapped to the results' unsigned ones, names
    from sites.json); the federation → registered / revoked; the signature file → signer."""
    folder = _run(tmp_path)
    now = time.time()
    (folder / "live.json").write_text(json.dumps({
        "run_name": "trial", "state": "training", "round": 3, "num_rounds": 4,
        "round_started": now - 5, "round_timeout": 600, "connected": 2, "min_nodes": 2,
        "sites": [{"node_id": 11, "site_name": "alpha", "status": "training"}],
        "waiting_for": ["alpha"], "message": "", "end": None}))
    (folder / "security.jsonl").write_text(
        json.dumps({"time": "t", "event": "key-in-use", "site": "beta", "key_sha256": "00",
                    "holder": "1.2.3.4", "peer": "5.6.7.8"}) + "\nnot json\n")
    (folder / "sites.json").write_text(json.dumps({"11": "alpha",
                                                   "18446744073709551615": "beta"}))
    _superlink_db(folder / "superlink.db", [
        (11, "online", "2026-01-01T00:00:00+00:00", None, now + 50, 30.0),
        (-1, "offline", "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00", now - 10,
         30.0)])
    st = run_state(folder, federation)
    json.dumps(st, allow_nan=False)  # what the endpoint sends

    assert [r["round"] for r in st["rounds"]] == [1, 2]
    assert st["rounds"][1]["server_eval"] == {"accuracy": 0.55, "macro_f1": 0.5, "kappa": 0.45}
    assert st["rounds"][0]["terms"]["train-nce"] == 4.0
    assert st["rounds"][1]["sites_ok"] == 1 and st["rounds"][1]["sites_total"] == 2
    assert st["chance"] == 0.25 and st["classes"] == ["a", "b", "c", "d"]
    series = {s["name"]: s for s in st["site_series"]}
    assert series["beta"]["accuracy"] == [0.6, None]
    assert series["beta"]["failures"] == {"out-of-memory": 1}
    assert series["alpha"]["epsilon"] == 2.5 and series["alpha"]["epsilon_round"] == 2
    assert series["alpha"]["bytes_down"] == 2000
    assert st["failures"] == {"out-of-memory": 1}
    assert st["live"]["round"] == 3 and st["live"]["state"] == st["state"] == "training"
    assert st["live"]["sites"][0] == {"node_id": "11", "site_name": "alpha", "status": "training"}
    assert [e["site"] for e in st["security"]] == ["beta"]
    assert st["teacher"] == {"sha256": "cd" * 32, "signer": "ef" * 32,
                             "signature": "for this teacher", "federation_key": False}
    sites = {s["name"]: s for s in st["sites"]}
    assert sites["alpha"]["online"] is True and sites["alpha"]["node_id"] == "11"
    assert sites["alpha"]["last_seen"] == pytest.approx(now - 10, abs=5)
    assert sites["beta"]["online"] is False and sites["beta"]["node_id"] == str(2**64 - 1)
    assert sites["beta"]["last_seen"] == datetime.datetime(
        2026, 1, 2, tzinfo=datetime.UTC).timestamp()
    assert sites["gamma"]["revoked"] and sites["gamma"]["online"] is None
    assert sites["alpha"]["registered"] and not sites["alpha"]["revoked"]
    assert "/secret/path" not in json.dumps(st)  # the coordinator's paths are not shown


def test_without_live_json_the_round_in_progress_follows_results(tmp_path):
    """No live.json (an older ServerApp): while this run folder's moma-server is alive the
    round in progress is the one after the last written; without it the run is stopped."""
    folder = _run(tmp_path)
    st = run_state(folder)
    assert st["state"] == "stopped" and st["live"]["round"] is None
    assert st["sites"] and st["security"] == [] and st["teacher"]["signer"] == "ef" * 32
    (folder / ".moma-server.lock").write_text(f"{os.getpid()}\n")
    st = run_state(folder)
    assert st["state"] == "running" and st["live"]["round"] == 3
    results = json.loads((folder / "results.json").read_text())
    results["final"] = {"status": "ok", "best_round": 2}
    (folder / "results.json").write_text(json.dumps(results))
    assert run_state(folder)["state"] == "finished"


def test_half_written_or_missing_files_do_not_break_it(tmp_path):
    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    (folder / "live.json").write_text('{"state": "waiting", "round": 0, "sites": [{"node')
    (folder / "results.json").write_text('{"rounds": [{"round": 1, "sites": 7, "train": 3}]}')
    (folder / "superlink.db").write_text("not a database")
    st = run_state(folder)
    assert st["rounds"][0]["round"] == 1 and st["live"]["derived"]
    assert dash_data.list_runs(tmp_path / "runs")[0]["name"] == "x"


def test_a_locked_superlink_database_is_skipped(tmp_path):
    db = tmp_path / "superlink.db"
    _superlink_db(db, [(5, "online", None, None, time.time() + 60, 30.0)])
    assert "5" in dash_data.superlink_nodes(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        assert dash_data.superlink_nodes(db) == {}
        assert time.monotonic() - t0 < 10
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../runs", "missing"])
def test_run_names_are_folder_names_only(tmp_path, name):
    (tmp_path / "runs" / "ok").mkdir(parents=True)
    (tmp_path / "runs" / "ok" / "results.json").write_text("{}")
    assert dash_data.run_folder(tmp_path / "runs", "ok") is not None
    assert dash_data.run_folder(tmp_path / "runs", name) is None


def test_loopback_names():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7")
    assert host_header_ok("127.0.0.1:8470") and host_header_ok("[::1]:8470")
    assert host_header_ok("localhost")
    assert not host_header_ok("evil.example:8470") and not host_header_ok(None)


def _get(port: int, path: str, host: str | None = None, method: str = "GET"):
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Host": host} if host else {}
    con.request(method, path, headers=headers)
    resp = con.getresponse()
    return resp, resp.read()


def test_http_endpoints(tmp_path):
    """The page and its assets come from the package (no remote source: the CSP says so), the
    JSON endpoints answer, another Host than loopback (DNS rebinding) and writes are refused."""
    _run(tmp_path)
    with Dashboard(tmp_path / "runs", port=0, current="trial") as dash:
        resp, body = _get(dash.port, "/")
        assert resp.status == 200 and b"/static/dashboard.js" in body
        csp = resp.getheader("Content-Security-Policy")
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert b"http" not in body.replace(b'lang="en"', b"")  # nothing fetched from elsewhere
        for asset in ("/static/dashboard.js", "/static/dashboard.css"):
            resp, body = _get(dash.port, asset)
            assert resp.status == 200 and body
            assert b"innerHTML" not in body and b"http://" not in body.replace(
                b"http://www.w3.org/2000/svg", b"")
        resp, body = _get(dash.port, "/api/runs")
        assert json.loads(body) == {"runs": [json.loads(body)["runs"][0]], "current": "trial"}
        resp, body = _get(dash.port, "/api/run/trial")
        assert resp.status == 200 and json.loads(body)["rounds"][1]["round"] == 2
        assert _get(dash.port, "/api/run/..%2Ftrial")[0].status == 404
        assert _get(dash.port, "/static/../data.py")[0].status == 404
        assert _get(dash.port, "/", host="attacker.example")[0].status == 403
        assert _get(dash.port, "/api/run/trial", method="POST")[0].status == 405


def test_refusals_are_one_line(tmp_path):
    """A non-loopback dashboard without a federation, and a busy dashboard port given on the
    command line, are refused with one line and exit code 2 before anything starts."""
    with pytest.raises(DashboardError, match="needs --federation"):
        Dashboard(tmp_path, host="0.0.0.0", port=0)
    out = subprocess.run([str(BIN / "moma-server"), "--dashboard-only", "--runs-dir",
                          str(tmp_path), "--dashboard-host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "needs --federation" in out.stderr
    from tests.helpers import TARGET_CLASSES, tiny_teacher

    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([str(BIN / "moma-server"), "--insecure", "--teacher", str(teacher),
                              "--classes", ",".join(TARGET_CLASSES), "--runs-dir",
                              str(tmp_path / "runs"), "--name", "busy", "--port", "1",
                              "--dashboard-port", str(port)],
                             capture_output=True, text=True, timeout=300)
    err = [line for line in out.stderr.splitlines() if line.startswith("error")]
    assert out.returncode == 2 and len(err) == 1 and "dashboard port" in err[0], out.stderr
    assert not (tmp_path / "runs" / "busy" / "superlink.log").exists()


# -- a remote dashboard: HTTPS, operator certificates only --------------------------------------

def _external_ip() -> str | None:
    """A non-loopback IPv4 address of this host (the dashboard binds it)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    for word in out.stdout.split():
        try:
            ip = ipaddress.ip_address(word)
        except ValueError:
            continue
        if ip.version == 4 and not ip.is_loopback:
            return word
    return None


def _client_cert(tmp: Path, name: str, ca_cert: x509.Certificate, ca_key, unit: str
                 ) -> tuple[Path, Path]:
    """A client certificate with subject OU ``unit``, made here (not by moma-deploy)."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    crt, pem = tmp / f"{name}.crt", tmp / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def _https(ip: str, port: int, ca: Path, cert: tuple[Path, Path] | None) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    con = http.client.HTTPSConnection(ip, port, context=ctx, timeout=60)
    con.request("GET", "/api/runs")
    resp = con.getresponse()
    resp.read()
    return resp.status


def test_remote_dashboard_admits_operators_only(tmp_path, federation):
    """Bound to this host's non-loopback address: HTTPS with the federation's server
    certificate; no client certificate, or one from another CA, fails the handshake; a
    certificate of the federation's CA that is not an operator's (even with the operator OU,
    when moma-deploy did not issue it), or a revoked operator's, gets 403; the operator
    certificate moma-deploy made gets 200."""
    from deploy.federation import Federation
    from deploy.pki import load_cert, load_private_key, make_ca

    ip = _external_ip()
    if ip is None:
        pytest.skip("this host has no non-loopback IPv4 address to bind the dashboard to")
    fed = Federation.load(federation)
    fed.add_operator("alice")
    fed.add_operator("carol")
    fed.revoke_operator("carol")
    operator, revoked = (fed.operator_files(n)[:2] for n in ("alice", "carol"))
    ca, ca_key = load_cert(fed.ca_cert), load_private_key(fed.ca_key)
    site = _client_cert(tmp_path, "alpha", ca, ca_key, "moma-site")
    forged = _client_cert(tmp_path, "alice", ca, ca_key, "moma-operator")  # not the issued one
    other_ca, other_key = make_ca("elsewhere")
    foreign = _client_cert(tmp_path, "mallory", other_ca, other_key, "moma-operator")
    _run(tmp_path)
    with Dashboard(tmp_path / "runs", host=ip, port=0, federation=federation) as dash:
        assert dash.url.startswith("https://")
        for cert in (None, foreign):
            with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
                _https(ip, dash.port, fed.ca_cert, cert)
        for cert in (site, forged, revoked):
            assert _https(ip, dash.port, fed.ca_cert, cert) == 403
        assert _https(ip, dash.port, fed.ca_cert, operator) == 200
        # a plaintext request to the TLS port gets no page either
        with socket.create_connection((ip, dash.port), timeout=60) as s:
            s.sendall(b"GET /api/runs HTTP/1.0\r\nHost: x\r\n\r\n")
            s.settimeout(60)
            reply = s.recv(4096)
        assert b"200 OK" not in reply and b"runs" not in reply


def test_a_stalled_tls_client_does_not_block_others(tmp_path, federation):
    """The TLS handshake runs in the request's thread: a client that connects and says nothing
    does not hold the dashboard up for the operator."""
    from deploy.federation import Federation

    ip = _external_ip()
    if ip is None:
        pytest.skip("this host has no non-loopback IPv4 address to bind the dashboard to")
    fed = Federation.load(federation)
    fed.add_operator("bob")
    operator = fed.operator_files("bob")[:2]
    _run(tmp_path)
    with Dashboard(tmp_path / "runs", host=ip, port=0, federation=federation) as dash:
        stalled = socket.create_connection((ip, dash.port), timeout=60)
        try:
            result: list[int] = []
            t = threading.Thread(target=lambda: result.append(
                _https(ip, dash.port, fed.ca_cert, operator)))
            t.start()
            t.join(120)
            assert result == [200]
        finally:
            stalled.close()


def test_results_are_summarised_again_only_when_the_file_changed(tmp_path, monkeypatch):
    """Every open page polls every 2 s: an unchanged results.json is not read again, a
    changed one is."""
    from server.dashboard import data

    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "results.json"
    path.write_text(json.dumps({"config": {"classes": "a,b"}, "rounds": []}))
    calls = []
    real = data._rounds
    monkeypatch.setattr(data, "_rounds", lambda results: calls.append(1) or real(results))
    data.run_state(folder)
    data.run_state(folder)
    assert len(calls) == 1
    path.write_text(json.dumps({"config": {"classes": "a,b,c"}, "rounds": []}))
    assert data.run_state(folder)["classes"] == ["a", "b", "c"]
    assert len(calls) == 2
