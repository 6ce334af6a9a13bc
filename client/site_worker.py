"""The site's warm worker: one long-lived process that does the site's work for every message.

Flower starts a fresh ``flwr-clientapp`` process for every message, and each one would import
torch and timm, decode the site's data and verify the teacher again before it trains: tens of
seconds per round on a small machine. ``moma-client`` therefore starts this worker once, next
to the SuperNode: it imports the training stack up front and keeps what it has decoded (the
site's datasets, verified teachers) between messages. The ClientApp process, named by the node
config's ``site-worker`` key, only forwards the message's plain content here over a Unix socket
and returns the answer; it runs the same :mod:`client.site_round` functions itself when the
worker is absent or gone, so a site never fails a round because of it.

The socket lives in a private folder (mode 0700) made by ``moma-client``; the worker also
refuses a peer of another user (``SO_PEERCRED``). Nothing crosses it that the ClientApp process
does not already hold. One request is served at a time (the SuperNode sends one message at a
time). The worker exits when the process that started it is gone.

Frames: an 8-byte big-endian length and a JSON header, then the binary parts whose lengths the
header lists (``parts``): the student file exactly as it came in the message
(:data:`moma_protocol.wire.STUDENT_FILE`), and the teacher file when it came along; the
answer's part is the student file the site sends.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import struct
import sys
import time
from pathlib import Path

log = logging.getLogger("moma.client.worker")

#: Node-config key naming the worker's socket (set by moma-client, never by the coordinator).
NODE_KEY = "site-worker"
_LEN = struct.Struct(">Q")
_MAX_HEADER = 16 << 20
_MAX_PART = 64 << 30
#: Longest path a Unix socket accepts on Linux (108 bytes with the terminating NUL).
MAX_SOCKET_PATH = 107


class WorkerUnavailable(ConnectionError):
    """The worker could not be reached, or stopped before it answered."""


class WorkerFailure(RuntimeError):
    """The worker ran the request and it failed: ``category`` is what the site reports."""

    category = "internal-error"  # each instance: the category the worker chose

    def __init__(self, category: str) -> None:
        super().__init__(f"the site worker reported {category!r}")
        self.category = category


# -- frames ---------------------------------------------------------------------------------
def _send(sock: socket.socket, header: dict, parts: list[bytes]) -> None:
    body = json.dumps({**header, "parts": [len(p) for p in parts]}).encode()
    sock.sendall(_LEN.pack(len(body)) + body)
    for part in parts:
        sock.sendall(part)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if k == 0:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[dict, list[bytes]]:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > _MAX_HEADER:
        raise ValueError(f"header of {n} bytes")
    header = json.loads(_recv_exact(sock, n))
    sizes = header.get("parts", []) if isinstance(header, dict) else None
    if not isinstance(sizes, list) or \
            not all(isinstance(s, int) and 0 <= s <= _MAX_PART for s in sizes):
        raise ValueError("malformed header")
    return header, [_recv_exact(sock, s) for s in sizes]


# -- the ClientApp side (no torch) ----------------------------------------------------------
def call(path: str, header: dict, parts: list[bytes] = ()) -> tuple[dict, list[bytes]]:
    """Send one request to the worker at ``path``; its answer header and parts.

    Raises :class:`WorkerUnavailable` when the worker cannot be reached or dies before its
    answer (the caller then does the work itself), :class:`WorkerFailure` when the work
    failed there.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            _send(sock, header, list(parts))
            reply, out = _recv(sock)
    except (OSError, EOFError, ValueError) as exc:
        raise WorkerUnavailable(f"site worker at {path}: {exc}") from exc
    if not reply.get("ok"):
        raise WorkerFailure(str(reply.get("category", "internal-error")))
    return reply, out


# -- the worker side ------------------------------------------------------------------------
def handle(header: dict, parts: list[bytes]) -> tuple[dict, list[bytes]]:
    """Run one request with :mod:`client.site_round`; the answer header and parts."""
    from client import site_round

    op = header.get("op")
    if op == "ping":
        return {"ok": True, "pid": os.getpid()}, []
    if op == "train":
        teacher = None
        if header.get("teacher") is not None:
            t = header["teacher"]
            teacher = site_round.TeacherDelivery(parts[1], t["sidecar"], t.get("signature"))
        fields = site_round.RoundFields(**header["fields"])
        blob, metrics, incoming = site_round.train(header["node_config"],
                                                   header["run_config"], fields, teacher,
                                                   parts[0])
        return {"ok": True, "metrics": metrics, "incoming": incoming}, [blob]
    if op == "evaluate":
        metrics = site_round.evaluate(header["node_config"], header["run_config"], parts[0])
        return {"ok": True, "metrics": metrics}, []
    raise ValueError(f"unknown request {op!r}")


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _serve_one(conn: socket.socket) -> None:
    from client.site_errors import error_category

    if _peer_uid(conn) != os.getuid():
        log.error("refused a connection from another user")
        return
    try:
        header, parts = _recv(conn)
    except (OSError, EOFError, ValueError) as exc:
        log.warning("unreadable request: %s", exc)
        return
    started = time.monotonic()
    try:
        reply, out = handle(header, parts)
        if header.get("op") != "ping":
            log.info("%s handled in %.1f s", header.get("op"), time.monotonic() - started)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # the category goes back; the details stay in this log
        category = error_category(exc)
        log.exception("%s failed; reported as %r", header.get("op"), category)
        reply, out = {"ok": False, "category": category}, []
    try:
        _send(conn, reply, out)
    except OSError as exc:  # the ClientApp process went away (its round was abandoned)
        log.warning("could not answer %s: %s", header.get("op"), exc)


def serve(path: Path, parent_pid: int | None = None, poll_s: float = 2.0) -> None:
    """Serve requests at ``path`` until the parent process is gone (or a signal)."""
    import client.site_training  # noqa: F401  (warm: torch, timm and the data stack)

    if len(str(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path too long for a Unix socket: {path}")
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        old = os.umask(0o177)
        try:
            server.bind(str(path))
        finally:
            os.umask(old)
        server.listen(4)
        server.settimeout(poll_s)
        log.info("site worker ready at %s (pid %d)", path, os.getpid())
        try:
            while parent_pid is None or os.getppid() == parent_pid:
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(None)
                    _serve_one(conn)
        finally:
            path.unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m client.site_worker",
                                description=__doc__.splitlines()[0])
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from deploy.runtime import exit_on_sigterm

    exit_on_sigterm()
    try:
        serve(args.socket, args.parent_pid)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
