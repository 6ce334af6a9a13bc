"""A site's key used by two SuperNodes at once (a copied kit).

Flower refuses the second activation of a key whose node is online, but says only "Failed to
activate SuperNode." and tells the coordinator nothing. The gate (:mod:`deploy.superlink`)
remembers per key where its SuperNode connects from and until when Flower counts it online; a
second authenticated activation while the holder is live is refused with a sentence naming the
holder's address, and a ``key-in-use`` event goes to the run folder's ``security.jsonl``, which
moma-server prints as it comes (:mod:`deploy.security_events`). A site that restarted after a
crash is not locked out longer than Flower itself locks it out.

Unit tests drive the gate with signed requests and a fake clock; the slow test runs a real
coordinator, the site, and a copy of the site's kit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy import security_events as events
from deploy.federation import Federation
from deploy.lifecycle import stop_groups
from deploy.provision import fingerprint
from deploy.superlink import ACTIVATE, DEACTIVATE, HEARTBEAT, KeyTracker, SiteGate

BIN = Path(sys.executable).parent
A, B = ("10.0.0.1", 50001), ("10.0.0.2", 50002)
LOCAL_A, LOCAL_B = ("127.0.0.1", 50001), ("127.0.0.1", 50002)


@pytest.fixture
def fed(tmp_path) -> Federation:
    return Federation.init(tmp_path / "fed", ["127.0.0.1"], 9092, ["site-a", "site-b"])


class Node:
    """A SuperNode's identity: signs requests as Flower's NodeAuthHttpInterceptor does."""

    def __init__(self, kit: Path) -> None:
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        self.key = load_ssh_private_key((kit / "node.key").read_bytes(), None)
        self.public = public_key_to_bytes(self.key.public_key())

    def headers(self, signer=None) -> list[tuple[bytes, bytes]]:
        from flwr.supercore.date import now
        from flwr.supercore.primitives.asymmetric import sign_message

        stamp = now().isoformat()
        signature = sign_message(signer or self.key, stamp.encode("ascii"))
        return [(b"flwr-public-key", base64.b64encode(self.public)),
                (b"flwr-timestamp", stamp.encode()),
                (b"flwr-signature", base64.b64encode(signature)),
                (b"content-type", b"application/protobuf")]


def body(path: str, node: Node, interval: float = 30.0) -> bytes:
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.node_pb2 import Node as NodeMsg

    if path == ACTIVATE:
        return ActivateNodeRequest(public_key=node.public,
                                   heartbeat_interval=interval).SerializeToString()
    if path == HEARTBEAT:
        return SendNodeHeartbeatRequest(node=NodeMsg(node_id=7),
                                        heartbeat_interval=interval).SerializeToString()
    return b""


class Flower:
    """The app behind the gate: answers ``status`` and records what reached it."""

    def __init__(self) -> None:
        self.reached: list[tuple[str, bytes]] = []
        self.status = 200

    async def __call__(self, scope, receive, send) -> None:
        message = await receive()
        self.reached.append((scope["path"], message.get("body", b"")))
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def gate(tmp_path, fed):
    """(gate, the app behind it, its clock, the run folder)."""
    run = tmp_path / "run"
    run.mkdir()
    keys = events.write_site_keys(fed, run / "site-keys.json")
    flower, clock = Flower(), Clock()
    return SiteGate(flower, control_token="t", events_dir=run, site_keys=keys,
                    tracker=KeyTracker(), clock=clock), flower, clock, run


def request(gate: SiteGate, path: str, node: Node, client, signer=None,
            interval: float = 30.0) -> tuple[int, dict]:
    """One Fleet request through the gate; (status, JSON body or {})."""
    sent: list[dict] = []
    payload = body(path, node, interval)

    async def receive() -> dict:
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "client": client, "server": ("0.0.0.0", 9092),
             "headers": node.headers(signer), "method": "POST"}
    asyncio.run(gate(scope, receive, send))
    data = sent[1].get("body", b"") if len(sent) > 1 else b""
    return sent[0]["status"], (json.loads(data) if data else {})


# -- the gate, unit level ---------------------------------------------------------------------
@pytest.mark.parametrize("first,second", [(A, B), (LOCAL_A, LOCAL_B)])
def test_a_second_activation_while_the_holder_is_live_is_refused_and_recorded(
        gate, fed, first, second):
    gate, flower, clock, run = gate
    holder = copy = Node(fed.kit("site-a"))  # the same key: a copied kit
    assert request(gate, ACTIVATE, holder, first)[0] == 200
    clock.t += 5
    assert request(gate, "/v1/fleet/pull-messages", holder, first)[0] == 200
    clock.t += 10
    reached = len(flower.reached)
    status, answer = request(gate, ACTIVATE, copy, second)
    assert status == 412 and len(flower.reached) == reached  # Flower never saw it
    assert answer["code"] == 2004 and answer["detail"] == "Failed to activate SuperNode."
    assert answer["extra"].startswith(f"{events.KEY_IN_USE} {first[0]} since ")
    assert "the key was copied: tell the coordinator" in answer["extra"]
    [event] = events.read_events(run)
    assert event["event"] == "key-in-use" and event["site"] == "site-a"
    assert (event["holder"], event["peer"]) == (first[0], second[0])
    assert event["key_sha256"] == fingerprint(fed.data["sites"]["site-a"]["public_key"])
    # the holder itself goes on undisturbed; another site's key is not affected
    assert request(gate, "/v1/fleet/pull-messages", holder, first)[0] == 200
    assert request(gate, ACTIVATE, Node(fed.kit("site-b")), second)[0] == 200


def test_heartbeats_keep_the_holder_online_and_a_sign_off_releases_the_key(gate, fed):
    gate, flower, clock, run = gate
    node = Node(fed.kit("site-a"))
    assert request(gate, ACTIVATE, node, A)[0] == 200
    for _ in range(4):  # 100 s of heartbeats (every 25 s, interval 30 s)
        clock.t += 25
        assert request(gate, HEARTBEAT, node, A)[0] == 200
    clock.t += 20
    assert request(gate, ACTIVATE, node, B)[0] == 412
    assert request(gate, DEACTIVATE, node, A)[0] == 200  # the holder stops cleanly
    assert request(gate, ACTIVATE, node, B)[0] == 200  # the key is free at once
    assert len(events.read_events(run)) == 1


def test_a_site_that_restarted_after_its_holder_went_silent_is_not_locked_out(gate, fed):
    """The holder crashed (no sign-off): Flower counts it online for 2 heartbeat intervals
    after its last heartbeat; the gate refuses no longer than that, and without an event."""
    gate, flower, clock, run = gate
    node = Node(fed.kit("site-a"))
    assert request(gate, ACTIVATE, node, A, interval=30)[0] == 200
    clock.t += 40  # silent for longer than a heartbeat interval, still within Flower's window
    status, answer = request(gate, ACTIVATE, node, A)
    assert status == 412 and answer["extra"].startswith(events.KEY_STILL_ONLINE)
    assert events.site_hint(answer["extra"]) and "copied" not in events.site_hint(
        answer["extra"])
    clock.t += 21  # past last activation + 2 × 30 s: Flower admits it, so does the gate
    assert request(gate, ACTIVATE, node, A)[0] == 200
    assert events.read_events(run) == []


def test_an_unauthenticated_activation_learns_nothing_and_records_nothing(gate, fed):
    """A key is public: anyone may send it. Only the holder of its private key hears where the
    key is in use; a request that is not signed by it goes to Flower (which refuses it)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    gate, flower, clock, run = gate
    node = Node(fed.kit("site-a"))
    assert request(gate, ACTIVATE, node, A)[0] == 200
    flower.status = 401
    forged = ec.generate_private_key(ec.SECP384R1())
    status, answer = request(gate, ACTIVATE, node, B, signer=forged)
    assert status == 401 and answer == {}  # Flower's answer, not the gate's
    assert flower.reached[-1][0] == ACTIVATE
    assert events.read_events(run) == []
    # a request Flower refused does not make its sender a holder
    other = Node(fed.kit("site-b"))
    assert request(gate, ACTIVATE, other, B)[0] == 401
    flower.status = 200
    assert request(gate, ACTIVATE, other, A)[0] == 200


def test_the_gate_replays_the_body_it_read_to_flower(gate, fed):
    gate, flower, clock, run = gate
    node = Node(fed.kit("site-a"))
    request(gate, ACTIVATE, node, A)
    assert flower.reached == [(ACTIVATE, body(ACTIVATE, node))]


# -- what the site and the coordinator see ---------------------------------------------------
def supernode_output(extra: str) -> list[str]:
    """The lines flower-supernode (1.42) prints for a refused activation, built with Flower's
    own parsing of the gate's answer (fleet_http_connection.http_request_response)."""
    from flwr.supercore.error import FlowerError

    err = FlowerError.from_json(json.dumps({"code": 2004, "detail":
                                            "Failed to activate SuperNode.", "extra": extra}))
    message = f"[code: {err.code}] {err.message}\n{err.public_details}"
    text = "Exit Code: 200\nFailed to initialize the connection to the SuperLink.\n" + message
    return [f"ERROR :     {line}" if i == 0 else line
            for i, line in enumerate(text.splitlines())]


def test_site_hint_names_the_copied_key_and_nothing_else():
    extra = (f"{events.KEY_IN_USE} 10.0.0.1 since 2026-01-05T10:31:07+00:00; if that is not "
             "you, the key was copied: tell the coordinator")
    hints = [h for line in supernode_output(extra) if (h := events.site_hint(line))]
    assert len(hints) == 1
    assert "10.0.0.1 since 2026-01-05T10:31:07+00:00" in hints[0] and "copied" in hints[0]
    # Flower's own refusals (unregistered, revoked) and other lines: no hint
    for line in ["[code: 2004] Failed to activate SuperNode.", "Exit Code: 200",
                 "Failed to initialize the connection to the SuperLink.",
                 "Connection attempt failed, retrying in 3.21 seconds", ""]:
        assert events.site_hint(line) is None, line


def test_the_event_watcher_prints_each_new_event_once(tmp_path):
    events.append_event(tmp_path, {"time": "t0", "event": "key-in-use", "site": "old"})
    printed: list[str] = []
    watcher = events.EventWatcher(tmp_path, printed.append, interval=0.05)
    event = {"time": "t1", "event": "key-in-use", "site": "site-a", "key_sha256": "SHA256:x",
             "holder": "10.0.0.1", "peer": "10.0.0.2"}
    events.append_event(tmp_path, event)
    with open(tmp_path / events.EVENTS_FILE, "ab") as f:
        f.write(b'{"torn": ')  # a line still being written
    assert watcher.poll() == [event]
    assert watcher.poll() == []
    assert len(printed) == 1 and "site-a" in printed[0] and "10.0.0.2" in printed[0]
    assert "revoke-site" in printed[0]
    assert [e["site"] for e in events.read_events(tmp_path)] == ["old", "site-a"]


# -- for real ----------------------------------------------------------------------------------
SMALL = ("objective=\"ce\" image-size=32 batch-size=16 queue-size=64 optimizer=\"adamw\" "
         "lr=0.003 augment=\"flip\" min-train-nodes=1 min-available-nodes=1 "
         "round-timeout=600.0")
CEILING = 900.0


def _wait(what: str, condition, procs: dict, logs: Path, timeout: float = CEILING) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for name, proc in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited ({proc.returncode}) while waiting for {what}:\n"
                            + (logs / f"{name}.log").read_text(errors="replace")[-3000:])
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_copied_kit_is_refused_while_the_site_trains(tmp_path):
    from deploy.runtime import free_port

    port = free_port()
    r = subprocess.run([str(BIN / "moma-deploy"), "init", str(tmp_path / "fed"),
                        "--server-host", "127.0.0.1", "--port", str(port), "--site", "site-a"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    fed = Federation.load(tmp_path / "fed")
    copied = tmp_path / "copied-kit"
    shutil.copytree(fed.kit("site-a"), copied)  # the same key, on "another machine"
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        procs[name] = subprocess.Popen(cmd, env=env, stdout=open(logs / f"{name}.log", "wb"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return procs[name]

    def site(kit: Path, name: str, *extra: str) -> list[str]:
        return [str(BIN / "moma-client"), "--kit", str(kit), "--data", "synthetic:target",
                "--site-index", "0", "--num-sites", "1", "--n", "48", "--cache-dir",
                str(tmp_path / f"cache-{name}"), "--ledger", str(tmp_path / f"{name}.json"),
                "--clientappio-port", str(free_port()), *extra]

    runs = tmp_path / "runs"
    link_log = runs / "copy" / "superlink.log"
    try:
        server = start("server", [
            str(BIN / "moma-server"), "--federation", str(fed.root), "--name", "copy",
            "--runs-dir", str(runs), "--host", "127.0.0.1", "--port", str(port),
            "--rounds", "2", "--classes", "benign,grade_1,grade_2,grade_3",
            "--run-config", SMALL])
        _wait("the site's registration", lambda: "registered sites" in
              (logs / "server.log").read_text(errors="replace"), procs, logs)
        start("site", site(fed.kit("site-a"), "site"))
        _wait("the site's activation", lambda: "Activated node_id" in
              link_log.read_text(errors="replace"), procs, logs)
        copy = start("copy", site(copied, "copy", "--max-retries", "1", "--max-wait-time",
                                  "600"))
        copy_log = logs / "copy.log"
        deadline = time.monotonic() + CEILING
        while f"{events.KEY_IN_USE} 127.0.0.1 since " not in copy_log.read_text(errors="replace"):
            assert copy.poll() is None or copy.returncode == 2, copy_log.read_text()[-3000:]
            assert time.monotonic() < deadline, copy_log.read_text()[-3000:]
            time.sleep(1)
        output = copy_log.read_text(errors="replace")
        assert [h for line in output.splitlines() if (h := events.site_hint(line))]
        assert link_log.read_text(errors="replace").count("Activated node_id") == 1
        [event] = events.read_events(runs / "copy")
        assert event["event"] == "key-in-use" and event["site"] == "site-a"
        assert event["holder"] == event["peer"] == "127.0.0.1"
        assert event["key_sha256"] == fingerprint(fed.data["sites"]["site-a"]["public_key"])
        # the first keeps training: the run completes with it in every round
        try:
            rc = server.wait(CEILING)
        except subprocess.TimeoutExpired:
            pytest.fail("moma-server did not finish:\n" + (logs / "server.log").read_text())
        server_log = (logs / "server.log").read_text(errors="replace")
        assert rc == 0, server_log[-4000:]
        assert "security: site-a's key" in server_log  # printed while the run went
        results = json.loads((runs / "copy" / "results.json").read_text())
        assert [r["round"] for r in results["rounds"]] == [1, 2]
        for entry in results["rounds"]:
            assert [s["site_name"] for s in entry["sites"].values()] == ["site-a"], entry
        assert procs["site"].poll() is None, "the real site stopped"
    finally:
        stop_groups(procs.values())
