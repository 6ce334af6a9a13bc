"""Who may read the dashboard.

Bound to loopback (the default) it is plain HTTP for this host's users, and a request whose
``Host`` header is not a loopback name is refused (a web page elsewhere cannot reach it through
DNS rebinding). Bound to any other address it needs ``--federation``: it then serves HTTPS with
the federation's server certificate and admits only a client certificate signed by the
federation's CA that is an operator certificate (``moma-deploy add-operator``); the TLS
handshake refuses anything not signed by the CA, and the request is refused (403) when the
certificate is not an operator's.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class DashboardError(ValueError):
    """The dashboard cannot be served as asked (one line for the operator)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this host's loopback."""
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def operator_name(cert: bytes | None, federation: Path) -> str | None:
    """The operator's name when ``cert`` (DER, as the TLS peer sent it) is the current
    certificate of a not revoked operator of ``federation`` (signed by its CA, subject OU
    ``moma-operator``, client authentication; ``Federation.operator_name``), else None. The
    federation's file is read at every request: a revocation applies at once."""
    if not cert:
        return None
    from deploy.federation import Federation, FederationError

    try:
        return Federation.load(federation).operator_name(cert)
    except (FederationError, OSError, ValueError):
        return None


def host_header_ok(host_header: str | None) -> bool:
    """For a loopback-bound dashboard: the request names a loopback host."""
    if not host_header:
        return False
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return is_loopback(host)


def check_bind(host: str, federation: Path | None) -> None:
    """Refuse a non-loopback bind without a federation (one line)."""
    if not is_loopback(host) and federation is None:
        raise DashboardError(f"--dashboard-host {host}: a dashboard reachable from other hosts "
                             "needs --federation (HTTPS, operator certificates only); keep it on "
                             "127.0.0.1 and use an SSH tunnel, or give --federation")


def tls_context(federation: Path) -> ssl.SSLContext:
    """HTTPS with the federation's server certificate, client certificates required and
    verified against the federation's CA."""
    from deploy.federation import Federation

    fed = Federation.load(federation)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(fed.server_cert), str(fed.server_key))
    ctx.load_verify_locations(cafile=str(fed.ca_cert))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
