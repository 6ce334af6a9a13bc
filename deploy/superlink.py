"""Flower's SuperLink with everything but the sites' API closed to the network.

Flower 1.41 serves the Fleet API (sites), the Control API (run submission, node registration)
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

Usage: ``python -m deploy.superlink <flower-superlink arguments>``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import posixpath
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger("moma.superlink")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

#: Paths any host may reach: the sites' Fleet API and the health probe.
PUBLIC_PREFIXES = ("/v1/fleet/",)
PUBLIC_PATHS = frozenset({"/health"})


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


class SiteGate:
    """ASGI middleware: only the Fleet API is reachable from other hosts."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope.get("type") in ("http", "websocket"):
            path = str(scope.get("path", ""))
            client, server = scope.get("client"), scope.get("server")
            host = client[0] if client else None
            if not allowed(path, host, server[0] if server else None):
                log.warning("refused %s from %s: only the coordinator host may use it",
                            path, host)
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps({"detail": "forbidden: only the coordinator host may use "
                                             "this API"}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _install_gate() -> None:
    import flwr.superlink.main as flower_main

    create_app = flower_main.create_app

    def gated_create_app(*args: Any, **kwargs: Any):
        app = create_app(*args, **kwargs)
        app.add_middleware(SiteGate)  # outermost: runs before any Flower middleware
        return app

    flower_main.create_app = gated_create_app


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
    from flwr.common.constant import Status
    from flwr.superlink.config_loader import (
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
    from flwr.superlink.cli import flower_superlink

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    database = database_arg(sys.argv[1:])
    if database is not None:
        for run_id in retire_stale_runs(database):
            log.info("stopped run %s, left unfinished by a previous coordinator", run_id)
    _install_gate()
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
