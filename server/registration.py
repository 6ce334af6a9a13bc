"""The SuperLink's registered sites kept equal to the federation folder's active sites.

Before each run ``moma-server`` lists the node keys registered with its SuperLink (persisted in
``superlink.db``) over the loopback Control API, unregisters every key that is revoked or
unknown to the federation, and registers each active site's key under the site's name. The
result maps node IDs to site names: the coordinator names sites by their registered key, never
by what a site says of itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_ssh_public_key

#: Node states in which a key no longer admits anyone.
_GONE = {"unregistered", "deleted"}


def public_key_bytes(openssh_line: str) -> bytes:
    """A site's OpenSSH public key as the SuperLink stores it (PEM SubjectPublicKeyInfo)."""
    from server.flwr_compat import public_key_to_bytes

    return public_key_to_bytes(load_ssh_public_key(openssh_line.encode()))


def plan(registered: list[tuple[int, bytes, str]], active: dict[str, str]
         ) -> tuple[dict[int, str], list[int], dict[str, bytes]]:
    """What to keep, drop and add.

    ``registered``: (node id, public key bytes, status) of the SuperLink's nodes; ``active``:
    site name → OpenSSH public key line. Returns (kept node id → name, node ids to unregister,
    name → key bytes to register).
    """
    wanted = {public_key_bytes(line): name for name, line in active.items()}
    keep: dict[int, str] = {}
    drop: list[int] = []
    for node_id, key, status in registered:
        if status in _GONE:
            continue
        if key in wanted and wanted[key] not in keep.values():
            keep[node_id] = wanted[key]
        else:
            drop.append(node_id)
    add = {name: key for key, name in wanted.items() if name not in keep.values()}
    return keep, drop, add


def register_sites(fed, flwr_home: Path) -> dict[str, str]:
    """Synchronise the SuperLink's registrations with ``fed``; returns node id → site name."""
    from server.flwr_compat import (
        ListNodesRequest,
        RegisterNodeRequest,
        UnregisterNodeRequest,
        init_http_client_from_connection,
        read_superlink_connection,
    )

    os.environ["FLWR_HOME"] = str(flwr_home)
    client = init_http_client_from_connection(read_superlink_connection("moma"))
    try:
        nodes = client.ListNodes(ListNodesRequest()).nodes_info
        keep, drop, add = plan([(n.node_id, bytes(n.public_key), n.status) for n in nodes],
                               fed.active_sites())
        for node_id in drop:
            client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
        for name, key in add.items():
            res = client.RegisterNode(RegisterNodeRequest(public_key=key, name=name))
            if not res.node_id:
                raise RuntimeError(f"the SuperLink did not register site {name}")
            keep[res.node_id] = name
    finally:
        client.close()
    return {str(k): v for k, v in sorted(keep.items())}
