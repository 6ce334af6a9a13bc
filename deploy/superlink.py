"""Flower's SuperLink with everything but the sites' API closed to the network.

Flower 1.42 serves the Fleet API (sites), the Control API (run submission, node registration)
and the Runtime API (the ServerApp's link) on one ``--host/--port``; without Flower's
enterprise account login, anyone who reaches that port could submit a run, and its ServerApp
would execute on the coordinator and push code to every site. This launcher runs the unchanged
``flower-superlink`` command with one ASGI gate in front of Flower's app: requests from other
hosts reach only ``/v1/fleet/*`` (and ``/health``); everything else answers 403 unless it comes
from this host (loopback, or the address the SuperLink is bound to), where ``moma-server``
submits its own run.

Before it starts on a state database a previous coordinator left behind (the SuperLink's
state lives in the run folder, so ``moma-server --resume`` finds it), every run that database
still holds as unfinished is stopped with Flower's own ``stop_run``: its coordinator is gone,
and a site that reconnects must not be handed that run's undelivered instructions (it would
train a round nobody aggregates, and spend privacy budget on it).

Two more checks, both in the same gate:

* **Control API credential.** Even from this host, ``/v1/control/*`` (run submission, node
  registration) needs ``Authorization: Bearer <secret>``: the secret is made per start by
  ``moma-server`` (:func:`write_control_credential`), kept 0600 in the run's ``FLWR_HOME``,
  where Flower's ``flwr`` CLI finds it in its credential store and sends it with every Control
  API call; the gate reads it from the file named by ``MOMA_CONTROL_TOKEN_FILE`` and removes
  that variable before Flower starts anything. Without it every Control API request is refused.
  The Runtime API (``/v1/runtime/*``, the ServerApp's link, from loopback) is not affected.
* **A site's key used twice.** Per node key the gate remembers where its SuperNode connects from,
  since when, and until when Flower counts it online (activation and heartbeats, exactly as
  Flower computes it). An authenticated ``activate-node`` for a key whose holder is online and
  was heard from within its heartbeat interval is refused with a sentence naming the holder's
  address, and a ``key-in-use`` event is appended to ``security.jsonl`` beside ``--database``
  (:mod:`deploy.security_events`). Flower itself refuses such an activation too (the node is
  ONLINE), without saying why; a holder that went silent is not protected longer than Flower
  protects it, so a site that restarted after a crash is admitted as soon as Flower would.

Usage: ``python -m deploy.superlink <flower-superlink arguments>``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import posixpath
import secrets
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("moma.superlink")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

#: Paths any host may reach: the sites' Fleet API and the health probe.
PUBLIC_PREFIXES = ("/v1/fleet/",)
PUBLIC_PATHS = frozenset({"/health"})
#: Paths this host reaches without the Control API credential: the ServerApp's Runtime API.
LOCAL_PREFIXES = ("/v1/runtime/",)
#: Names the file holding the Control API secret (removed from the environment at start-up).
CONTROL_TOKEN_ENV = "MOMA_CONTROL_TOKEN_FILE"
CONTROL_TOKEN_FILE = "control.token"
PUBLIC_KEY_HEADER = b"flwr-public-key"
ACTIVATE, HEARTBEAT = "/v1/fleet/activate-node", "/v1/fleet/send-node-heartbeat"
DEACTIVATE = "/v1/fleet/deactivate-node"
#: Flower's error code and public message for a refused activation (its SuperNode prints both).
ACTIVATION_FAILED = (2004, "Failed to activate SuperNode.")


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def allowed(path: str, client_host: str | None, server_host: str | None = None) -> bool:
    """Whether a request for ``path`` from ``client_host`` may pass the gate.

    Local requests pass: from loopback, or from the very address they arrived on (a
    connection from this host to its own interface address, when the SuperLink is bound to
    one address only).
    """
    if is_loopback(client_host) or (client_host is not None and client_host == server_host):
        return True
    if posixpath.normpath(path) != path or "\\" in path:
        return False  # no dot segments, doubled or trailing slashes from other hosts
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return True
    return False


def needs_credential(path: str) -> bool:
    """Whether a request from this host needs the Control API credential: everything but the
    Fleet and Runtime APIs and the health probe (and any path with dot segments)."""
    if posixpath.normpath(path) != path or "\\" in path:
        return True
    return not (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES + LOCAL_PREFIXES))


def write_control_credential(flwr_home: Path, address: str) -> Path:
    """A fresh Control API secret for the SuperLink at ``address`` (as the flwr CLI's
    ``config.toml`` names it): ``FLWR_HOME/control.token`` (0600, for the gate, named by
    ``MOMA_CONTROL_TOKEN_FILE``) and the same secret as the access token in Flower's credential
    store ``FLWR_HOME/credentials.yaml`` (0600), so ``flwr run``/``flwr ls`` with this
    ``FLWR_HOME`` send it. Also points this process's Flower credential store there (the
    in-process Control API client of :mod:`server.registration`). Returns the token file."""
    from deploy.flwr_compat import (
        ACCESS_TOKEN_STORE_KEY,
        AUTHN_TYPE_STORE_KEY,
        REFRESH_TOKEN_STORE_KEY,
        file_credential_store,
        point_credential_store,
    )

    flwr_home.mkdir(parents=True, exist_ok=True)
    flwr_home.chmod(0o700)
    token = secrets.token_urlsafe(32)
    token_file = flwr_home / CONTROL_TOKEN_FILE
    tmp = flwr_home / f".{CONTROL_TOKEN_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, token_file)
    path = flwr_home / "credentials.yaml"
    store = file_credential_store.FileCredentialStore(path)
    store.set(AUTHN_TYPE_STORE_KEY % address, b"oidc")  # Flower's bearer-token CLI plugin
    store.set(ACCESS_TOKEN_STORE_KEY % address, token.encode())
    store.set(REFRESH_TOKEN_STORE_KEY % address, b"none")  # never used: the gate answers 403
    path.chmod(0o600)
    point_credential_store(path)
    return token_file


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


@dataclass
class Holder:
    """The SuperNode that last activated with a key."""

    peer: str | None
    since: float  # activation time
    last_seen: float  # last authenticated Fleet request
    interval: float  # its heartbeat interval
    online_until: float  # as Flower computes it: last activation/heartbeat + patience × interval


class KeyTracker:
    """Per node key: who holds it, since when, until when Flower counts it online."""

    def __init__(self, patience: float | None = None) -> None:
        if patience is None:
            from deploy.flwr_compat import HEARTBEAT_PATIENCE

            patience = HEARTBEAT_PATIENCE
        self.patience = patience
        self.holders: dict[bytes, Holder] = {}
        self.lock = threading.Lock()

    def activated(self, key: bytes, peer: str | None, at: float, interval: float) -> None:
        with self.lock:
            self.holders[key] = Holder(peer, at, at, interval, at + self.patience * interval)

    def heartbeat(self, key: bytes, peer: str | None, at: float, interval: float) -> None:
        with self.lock:
            h = self.holders.get(key)
            if h is None:  # a SuperNode of before this SuperLink's start
                self.holders[key] = Holder(peer, at, at, interval,
                                           at + self.patience * interval)
                return
            h.last_seen, h.interval, h.peer = max(h.last_seen, at), interval, peer
            h.online_until = max(h.online_until, at + self.patience * interval)

    def seen(self, key: bytes, peer: str | None, at: float) -> None:
        with self.lock:
            h = self.holders.get(key)
            if h is not None:
                h.last_seen, h.peer = max(h.last_seen, at), peer

    def released(self, key: bytes) -> None:
        with self.lock:
            self.holders.pop(key, None)

    def conflict(self, key: bytes, now: float) -> tuple[str, Holder] | None:
        """Why an activation with ``key`` at ``now`` must be refused, or None.

        ``("in-use", holder)``: Flower counts the holder online and it was heard from within
        its heartbeat interval (a live SuperNode sends a heartbeat every 0.8 interval and polls
        far more often). ``("silent", holder)``: still counted online, but silent for longer:
        it probably stopped without signing off (a crash); Flower admits the key again after
        ``online_until``."""
        with self.lock:
            h = self.holders.get(key)
            if h is None or now >= h.online_until:
                return None
            if now - h.last_seen <= h.interval + 5.0:
                return "in-use", h
            return "silent", h


def _header(scope: Scope, name: bytes) -> list[bytes]:
    return [v for k, v in scope.get("headers", []) if k.lower() == name]


def authentic_activation(headers: list[tuple[bytes, bytes]], public_key: bytes) -> bool:
    """Whether an activate-node request is signed by the key it activates, as Flower's
    ``authenticate_node`` checks it (signed timestamp within Flower's tolerance)."""
    from deploy.flwr_compat import (
        FLEET_HTTP_SIGNATURE_HEADER,
        SYSTEM_TIME_TOLERANCE,
        TIMESTAMP_HEADER,
        TIMESTAMP_TOLERANCE,
        bytes_to_public_key,
        verify_signature,
    )

    values = {k.lower(): v for k, v in headers}
    try:
        key = base64.b64decode(values[PUBLIC_KEY_HEADER], validate=True)
        signature = base64.b64decode(values[FLEET_HTTP_SIGNATURE_HEADER.encode()],
                                     validate=True)
        timestamp = values[TIMESTAMP_HEADER.encode()].decode("ascii")
        age = (datetime.now(UTC) - datetime.fromisoformat(timestamp)).total_seconds()
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            return False
        return key == public_key and bool(verify_signature(
            bytes_to_public_key(key), timestamp.encode("ascii"), signature))
    except (KeyError, ValueError, TypeError, UnicodeError, binascii.Error):
        return False
    except Exception:  # noqa: BLE001 - e.g. a key of another curve: not authentic
        return False


async def _respond(send: Callable, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class SiteGate:
    """ASGI middleware: only the Fleet API is reachable from other hosts; the Control API only
    with the credential; an activation with a key in use elsewhere is refused and recorded.

    ``control_token``: the Control API secret (None: the Control API is refused to everyone).
    ``events_dir``: where ``security.jsonl`` goes (None: events are only logged).
    ``site_keys``: JSON {key fingerprint: site name} to name sites in events.
    """

    def __init__(self, app: ASGIApp, control_token: str | None = None,
                 events_dir: Path | None = None, site_keys: Path | None = None,
                 tracker: KeyTracker | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.control_token = control_token
        self.events_dir = Path(events_dir) if events_dir is not None else None
        self.site_keys = Path(site_keys) if site_keys is not None else None
        self.tracker = tracker or KeyTracker()
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        client, server = scope.get("client"), scope.get("server")
        host = client[0] if client else None
        if not allowed(path, host, server[0] if server else None):
            log.warning("refused %s from %s: only the coordinator host may use it", path, host)
            await self._refuse(scope, send, "forbidden: only the coordinator host may use "
                                             "this API")
            return
        if needs_credential(path):
            if not self._credential_ok(scope):
                log.warning("refused %s from %s: no valid Control API credential", path, host)
                await self._refuse(scope, send, "forbidden: the Control API needs the "
                                                 "coordinator's credential (the FLWR_HOME "
                                                 "moma-server writes in the run folder)")
                return
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", [])
                                          if k.lower() != b"authorization"]}
        if scope["type"] == "http" and path.startswith(PUBLIC_PREFIXES):
            await self._fleet(scope, receive, send, path, host)
            return
        await self.app(scope, receive, send)

    def _credential_ok(self, scope: Scope) -> bool:
        if not self.control_token:
            return False
        values = _header(scope, b"authorization")
        expected = f"Bearer {self.control_token}".encode()
        return len(values) == 1 and hmac.compare_digest(values[0], expected)

    @staticmethod
    async def _refuse(scope: Scope, send: Callable, detail: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _respond(send, 403, {"detail": detail})

    # -- the Fleet API: who holds which key ----------------------------------------------
    async def _fleet(self, scope: Scope, receive: Callable, send: Callable, path: str,
                     host: str | None) -> None:
        keys = _header(scope, PUBLIC_KEY_HEADER)
        try:
            key = base64.b64decode(keys[0], validate=True) if len(keys) == 1 else None
        except (binascii.Error, ValueError):
            key = None
        if key is None:
            await self.app(scope, receive, send)
            return
        at = self.clock()
        interval = None
        if path in (ACTIVATE, HEARTBEAT):
            body, receive = await _buffer(receive)
            interval, body_key = _parse_interval(path, body)
            if path == ACTIVATE and body_key == key and \
                    authentic_activation(scope.get("headers", []), key):
                refused = self.tracker.conflict(key, at)
                if refused is not None:
                    await self._refuse_activation(send, key, host, *refused)
                    return
        status: list[int] = []

        async def watched_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        await self.app(scope, receive, watched_send)
        if status != [200]:
            return  # not authenticated by Flower, or refused: nothing learnt
        if path == ACTIVATE and interval is not None:
            self.tracker.activated(key, host, at, interval)
        elif path == HEARTBEAT and interval is not None:
            self.tracker.heartbeat(key, host, at, interval)
        elif path == DEACTIVATE:
            self.tracker.released(key)
        else:
            self.tracker.seen(key, host, at)

    async def _refuse_activation(self, send: Callable, key: bytes, peer: str | None,
                                 why: str, holder: Holder) -> None:
        from deploy import security_events as events

        if why == "in-use":
            detail = (f"{events.KEY_IN_USE} {holder.peer} since {_utc(holder.since)}; if that "
                      "is not you, the key was copied: tell the coordinator")
            event = {"time": _utc(self.clock()), "event": "key-in-use",
                     "site": events.site_for_key(key, self.site_keys),
                     "key_sha256": events.key_fingerprint(key), "holder": holder.peer,
                     "peer": peer}
            log.warning("refused activate-node from %s: %s's key is in use by the SuperNode "
                        "from %s (since %s)", peer, event["site"] or event["key_sha256"],
                        holder.peer, _utc(holder.since))
            if self.events_dir is not None:
                try:
                    events.append_event(self.events_dir, event)
                except OSError as exc:
                    log.error("could not record the security event: %s", exc)
        else:
            detail = (f"{events.KEY_STILL_ONLINE} {_utc(holder.last_seen)} by a SuperNode from "
                      f"{holder.peer}, which is still counted online until "
                      f"{_utc(holder.online_until)}; try again after that")
            log.info("refused activate-node from %s: the key's previous connection (from %s) "
                     "is counted online until %s", peer, holder.peer,
                     _utc(holder.online_until))
        code, message = ACTIVATION_FAILED
        await _respond(send, 412, {"code": code, "detail": message, "extra": detail})


async def _buffer(receive: Callable) -> tuple[bytes, Callable]:
    """The request body, and a ``receive`` that replays it to the app."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def _parse_interval(path: str, body: bytes) -> tuple[float | None, bytes | None]:
    """(heartbeat interval, public key) of an activate-node or heartbeat request body."""
    from deploy.flwr_compat import ActivateNodeRequest, SendNodeHeartbeatRequest

    try:
        if path == ACTIVATE:
            req = ActivateNodeRequest.FromString(body)
            return float(req.heartbeat_interval), bytes(req.public_key)
        return float(SendNodeHeartbeatRequest.FromString(body).heartbeat_interval), None
    except Exception:  # noqa: BLE001 - a malformed body: Flower answers it, we learn nothing
        return None, None


def gate_settings(database: str | None) -> dict[str, Any]:
    """The gate's settings from the environment moma-server gives the SuperLink (the variables
    are removed, so that nothing Flower starts inherits them) and from ``--database``."""
    from deploy.security_events import SITE_KEYS_ENV

    token = None
    token_file = os.environ.pop(CONTROL_TOKEN_ENV, None)
    if token_file:
        try:
            token = Path(token_file).read_text().strip() or None
        except OSError as exc:
            log.error("cannot read the Control API credential %s (%s): the Control API is "
                      "refused", token_file, exc)
    else:
        log.warning("no %s: the Control API is refused to every caller", CONTROL_TOKEN_ENV)
    keys = os.environ.pop(SITE_KEYS_ENV, None)
    events_dir = None
    if database is not None and not database.startswith(":") and "://" not in database:
        events_dir = Path(database).resolve().parent
    return {"control_token": token, "events_dir": events_dir,
            "site_keys": Path(keys) if keys else None}


def _install_gate(settings: dict[str, Any] | None = None) -> None:
    from deploy.flwr_compat import wrap_superlink_app

    settings = settings or {}

    def gated(app: Any) -> Any:
        app.add_middleware(SiteGate, **settings)  # outermost: runs before Flower's middleware
        return app

    wrap_superlink_app(gated)


def database_arg(argv: list[str]) -> str | None:
    """The ``--database`` value in a flower-superlink command line, if any."""
    for i, arg in enumerate(argv):
        if arg == "--database" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--database="):
            return arg.split("=", 1)[1]
    return None


def retire_stale_runs(database: str) -> list[int]:
    """Stop every unfinished run in a SuperLink state file; returns their run IDs.

    Only an existing SQLite file is opened (a fresh or in-memory state has no runs).
    """
    from pathlib import Path

    if database.startswith(":") or "://" in database or not Path(database).is_file():
        return []
    from deploy.flwr_compat import (
        Status,
        get_federation_manager,
        get_objectstore_linkstate_factories,
    )

    _, factory = get_objectstore_linkstate_factories(database, get_federation_manager())
    state = factory.state()
    stale = [run.run_id for run in state.get_run_info()
             if run.status.status != Status.FINISHED]
    for run_id in stale:
        state.stop_run(run_id)
    return stale


def main() -> None:
    from deploy.flwr_compat import flower_superlink

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    database = database_arg(sys.argv[1:])
    if database is not None:
        for run_id in retire_stale_runs(database):
            log.info("stopped run %s, left unfinished by a previous coordinator", run_id)
    _install_gate(gate_settings(database))
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
