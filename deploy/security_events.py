"""Security events of a coordinator run: written by the SuperLink's gate, shown by moma-server.

The gate (:mod:`deploy.superlink`) appends one JSON object per line to ``security.jsonl`` in
the run folder (the folder of the SuperLink's ``--database`` file)::

    {"time": "2026-01-05T10:31:07+00:00", "event": "key-in-use", "site": "hospital-a",
     "key_sha256": "SHA256:…", "holder": "10.1.2.3", "peer": "10.9.8.7"}

``key-in-use``: a SuperNode tried to activate with a site's key while another SuperNode holding
that key was connected and live (``holder``: where the connected one comes from; ``peer``: the
refused one). Either the site started a second ``moma-client`` with the same kit, or its kit
was copied: then revoke the site and give it a new kit (``moma-deploy revoke-site``, then
``moma-deploy add-site --force``). ``key_sha256`` is the fingerprint ``moma-deploy list``
prints; ``site`` is the name from the key map moma-server hands the gate (``null`` if the key
is not in it).

:func:`read_events` reads the file, :class:`EventWatcher` prints new events while a run goes,
:func:`site_hint` turns the SuperNode's refusal into a sentence for the site's operator.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

EVENTS_FILE = "security.jsonl"
#: Environment variable naming the JSON file {key fingerprint: site name} for the gate.
SITE_KEYS_ENV = "MOMA_SITE_KEYS"
#: What the gate says to a SuperNode whose key is held by a live connection (the SuperNode
#: prints it on a line of its own; :func:`site_hint` looks for it).
KEY_IN_USE = "this site's key is already in use by a SuperNode connected from"
#: What the gate says when the key's previous connection went silent but Flower still counts
#: it as online (it is admitted again once that window has passed).
KEY_STILL_ONLINE = "this site's key was in use until"


def key_fingerprint(key: bytes | str) -> str:
    """``SHA256:…`` of a node key, as ``moma-deploy list`` prints it. ``key``: the key as the
    SuperLink sees it (PEM SubjectPublicKeyInfo bytes, Flower's ``flwr-public-key``) or an
    OpenSSH public key line (``federation.json``)."""
    from cryptography.hazmat.primitives import serialization

    if isinstance(key, str) or bytes(key).startswith((b"ecdsa-", b"ssh-")):
        line = key if isinstance(key, str) else key.decode()
        blob = base64.b64decode(line.split()[1])
    else:
        public = serialization.load_pem_public_key(bytes(key))
        line = public.public_bytes(serialization.Encoding.OpenSSH,
                                   serialization.PublicFormat.OpenSSH).decode()
        blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def write_site_keys(fed: Any, path: Path) -> Path:
    """{fingerprint: site name} of every site of the federation ``fed`` (revoked ones too: an
    event should name them), for the gate (:data:`SITE_KEYS_ENV`)."""
    names = {key_fingerprint(site["public_key"]): name
             for name, site in sorted(fed.data["sites"].items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(names, indent=2) + "\n")
    return path


def site_for_key(key: bytes | str, keys_file: Path | None) -> str | None:
    """The site name the key map gives a key, or None."""
    if keys_file is None:
        return None
    try:
        names = json.loads(Path(keys_file).read_text())
        return names.get(key_fingerprint(key)) if isinstance(names, dict) else None
    except (OSError, ValueError):
        return None


_append_lock = threading.Lock()


def append_event(run_dir: Path, event: dict[str, Any]) -> None:
    """Append one event (one JSON line, one ``write``) to ``run_dir/security.jsonl``."""
    line = (json.dumps(event, sort_keys=False) + "\n").encode()
    path = Path(run_dir) / EVENTS_FILE
    with _append_lock:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def _parse(lines: list[bytes]) -> list[dict[str, Any]]:
    events = []
    for raw in lines:
        try:
            event = json.loads(raw)
        except ValueError:
            continue  # a torn or foreign line is skipped, not fatal
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every event of a run folder, oldest first (none when there is no file)."""
    try:
        data = (Path(run_dir) / EVENTS_FILE).read_bytes()
    except FileNotFoundError:
        return []
    return _parse(data.splitlines())


def describe(event: dict[str, Any]) -> str:
    """One console line for an event."""
    if event.get("event") == "key-in-use":
        site = event.get("site") or "an unknown site"
        return (f"security: {site}'s key ({event.get('key_sha256')}) was used by a second "
                f"SuperNode from {event.get('peer')} while one from {event.get('holder')} is "
                "connected; the second was refused. If the site did not start two, its kit "
                f"was copied: moma-deploy revoke-site FED {event.get('site') or 'NAME'}, then "
                "add-site --force and give the site its new kit")
    return f"security: {json.dumps(event)}"


class EventWatcher:
    """Prints each event appended to ``run_dir/security.jsonl`` after it started (a daemon
    thread polling the file)."""

    def __init__(self, run_dir: Path, emit: Callable[[str], Any],
                 interval: float = 1.0) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.emit = emit
        self.interval = interval
        self._stop = threading.Event()
        try:
            self.offset = self.path.stat().st_size
        except FileNotFoundError:
            self.offset = 0
        self.thread = threading.Thread(target=self._run, name="security-events", daemon=True)

    def start(self) -> EventWatcher:
        self.thread.start()
        return self

    def poll(self) -> list[dict[str, Any]]:
        """Read the events appended since the last poll and emit each (complete lines only)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        events = _parse(data[:end].splitlines())
        for event in events:
            self.emit(describe(event))
        return events

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - printing events must never stop the run
                pass

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(5)
        try:
            self.poll()  # what came in since the last poll
        except Exception:  # noqa: BLE001
            pass


def watch(run_dir: Path, emit: Callable[[str], Any]) -> EventWatcher:
    """Start printing the run's new security events with ``emit``; ``.stop()`` ends it."""
    return EventWatcher(run_dir, emit).start()


def site_hint(line: str) -> str | None:
    """The sentence ``moma-client`` should print for a line of the SuperNode's output, or None.

    When the gate refuses an activation because the key is held by a live connection, the
    SuperNode (Flower 1.42) exits with ``Exit Code: 200`` and prints, each on its own line,
    ``Failed to initialize the connection to the SuperLink.``, ``[code: 2004] Failed to
    activate SuperNode.`` and the gate's sentence: ``this site's key is already in use by a
    SuperNode connected from <addr> since <time>; if that is not you, the key was copied: tell
    the coordinator``. While the key's previous connection went silent but is still counted
    online: ``this site's key was in use until <time> by a SuperNode from <addr>; …``.
    """
    if KEY_IN_USE in line:
        where = line[line.index(KEY_IN_USE) + len(KEY_IN_USE):].split(";")[0].strip()
        return ("the coordinator refused this site: its key is already in use by a SuperNode "
                f"connected from {where}. If you did not start another moma-client with this "
                "kit, the kit was copied: tell the coordinator (who revokes this key and gives "
                "you a new kit)")
    if KEY_STILL_ONLINE in line:
        return ("the coordinator still counts this site's previous connection as online (it "
                "stopped without signing off): this site is admitted once that connection's "
                "heartbeat window has passed, about a minute; moma-client keeps trying")
    return None
