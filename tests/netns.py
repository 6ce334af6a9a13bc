"""Multi-host test harness: one Linux network namespace per simulated host.

Integration tests that need a coordinator and hospital sites on *different IP addresses* use
:class:`Network`::

    from tests.netns import Network, require_netns

    def test_something():
        require_netns()                       # pytest.skip(reason) where namespaces are unavailable
        with Network("fed", ["server", "site1", "site2"]) as net:
            srv = net.popen("server", ["moma-server", "--address", f"{net.ip('server')}:9092"])
            net.run("site1", ["moma-client", ...], check=True)

Topology (nothing is created in, or changed in, the root namespace)::

    [host ns: eth0 10.231.X.2/24]--veth--+
    [host ns: eth0 10.231.X.3/24]--veth--+-- br0 in a private "hub" namespace
    [host ns: eth0 10.231.X.4/24]--veth--+

Every veth end lives in a harness namespace, so deleting the namespaces removes every link the
harness made. Because the whole segment is isolated from the root namespace, the /24 cannot
clash with the machine's real networks; ``X`` is still drawn at random (avoiding networks open in
this process) so that addresses differ between runs. If the kernel refuses to create a bridge,
the hub routes instead (hub ends own 10.231.X.1/32, hosts route the /24 via it, forwarding is
switched on *inside the hub namespace only*).

Namespace names are ``momans<PID>-<random>-<prefix>-...``: the creator's PID lets the sweeper that
runs in every :class:`Network` constructor delete namespaces left behind by killed test runs.

Cleanup (``__exit__``, :meth:`Network.close`, garbage collection or interpreter exit, whichever
comes first, exactly once): SIGKILL to the process group of every :meth:`Network.popen` child,
SIGKILL to every PID ``ip netns pids`` reports in each namespace (repeated until none are left),
reaping of the popen children, then ``ip netns del`` for every namespace (which destroys the veth
pairs and the bridge with them).
"""

from __future__ import annotations

import functools
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from deploy.lifecycle import pid_alive

NS_TAG = "momans"
"""Every namespace made by this harness starts with this tag, followed by the creator's PID."""

_NAME_RE = re.compile(rf"^{NS_TAG}(\d+)-")
_IP_TIMEOUT_S = 30.0
_KILL_DEADLINE_S = 10.0
_SUBNETS_IN_USE: set[int] = set()
_BRIDGE_KIND = "bridge"  # tests set a bogus kind to exercise the routed fallback


def _ip_bin() -> str | None:
    return shutil.which("ip")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` and return the completed process (raise with stderr when ``check``)."""
    binary = _ip_bin() or "ip"
    proc = subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"`ip {' '.join(args)}` failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", text)[:12] or "x"


def _probe() -> str | None:
    """Uncached body of :func:`netns_available`."""
    if _ip_bin() is None:
        return (
            "network namespaces unavailable: the `ip` command (Debian package iproute2) is not "
            "installed"
        )
    if os.geteuid() != 0:
        return f"network namespaces unavailable: creating them needs root (euid={os.geteuid()})"
    name = f"{NS_TAG}{os.getpid()}-{secrets.token_hex(3)}-probe"
    steps = [
        ("netns", "add", name),
        ("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"),
        ("netns", "exec", name, "true"),
    ]
    try:
        for step in steps:
            proc = _ip(*step, check=False)
            if proc.returncode != 0:
                err = proc.stderr.strip() or f"exit {proc.returncode}"
                return f"network namespaces unavailable: `ip {' '.join(step)}` failed: {err}"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"network namespaces unavailable: {exc}"
    finally:
        try:
            _ip("netns", "del", name, check=False)
        except (OSError, subprocess.SubprocessError):
            pass


@functools.cache
def netns_available() -> str | None:
    """None when this process can create network namespaces with veth links, else the reason.

    Decided once per process by creating (and deleting) a throwaway namespace.
    """
    return _probe()


def require_netns() -> None:
    """Skip the calling test (with the reason) unless network namespaces can be made here."""
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``), harness-made or not."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(ns: str) -> list[int]:
    """PIDs of processes whose network namespace is ``ns`` (empty when it is gone)."""
    proc = _ip("netns", "pids", ns, check=False)
    if proc.returncode != 0:
        return []
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def _kill_namespace_processes(ns: str) -> list[int]:
    """SIGKILL everything in ``ns`` until ``ip netns pids`` is empty; return PIDs still there."""
    me = os.getpid()
    deadline = time.monotonic() + _KILL_DEADLINE_S
    while True:
        pids = [pid for pid in namespace_pids(ns) if pid != me]
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def sweep_stale() -> list[str]:
    """Delete harness namespaces whose creator PID no longer exists; return their names."""
    removed = []
    for name in list_namespaces():
        match = _NAME_RE.match(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        _kill_namespace_processes(name)
        if _ip("netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


@dataclass
class _State:
    """Everything cleanup needs, kept apart from :class:`Network` for ``weakref.finalize``."""

    namespaces: list[str] = field(default_factory=list)
    popens: list[subprocess.Popen[Any]] = field(default_factory=list)
    subnet: int | None = None


def _cleanup(state: _State) -> list[str]:
    """Kill, reap and delete everything in ``state``; return the problems met (empty: all ok)."""
    problems: list[str] = []
    for proc in state.popens:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
    for ns in state.namespaces:
        left = _kill_namespace_processes(ns)
        if left:
            problems.append(f"processes {left} survived SIGKILL in namespace {ns}")
    for proc in state.popens:
        try:
            proc.wait(timeout=_KILL_DEADLINE_S)
        except subprocess.TimeoutExpired:
            problems.append(f"process {proc.pid} ({proc.args!r}) did not exit after SIGKILL")
    for ns in reversed(state.namespaces):
        proc = _ip("netns", "del", ns, check=False)
        if proc.returncode != 0 and ns in list_namespaces():
            problems.append(f"`ip netns del {ns}` failed: {proc.stderr.strip()}")
    state.namespaces.clear()
    if state.subnet is not None:
        _SUBNETS_IN_USE.discard(state.subnet)
    return problems


class Network:
    """Hosts in separate network namespaces on one isolated 10.231.X.0/24 segment.

    Created on construction; use it as a context manager (or call :meth:`close`) to tear it down.
    Call :func:`require_netns` first in tests so unavailable environments skip with a reason.
    """

    def __init__(self, prefix: str, hosts: list[str]) -> None:
        if not hosts:
            raise ValueError("Network needs at least one host")
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"host names must be unique: {hosts}")
        if len(hosts) > 250:
            raise ValueError("at most 250 hosts fit in the /24")
        reason = netns_available()
        if reason is not None:
            raise RuntimeError(reason)
        sweep_stale()

        free = [x for x in range(1, 255) if x not in _SUBNETS_IN_USE]
        subnet = random.choice(free)
        _SUBNETS_IN_USE.add(subnet)
        self._state = _State(subnet=subnet)
        self._finalizer = weakref.finalize(self, _cleanup, self._state)
        self.hosts: list[str] = list(hosts)
        self.subnet = f"10.231.{subnet}.0/24"
        self.bridged = True
        base = f"{NS_TAG}{os.getpid()}-{secrets.token_hex(3)}-{_safe(prefix)}"
        self._ns = {host: f"{base}-h{i}-{_safe(host)}" for i, host in enumerate(hosts)}
        self._ip = {host: f"10.231.{subnet}.{i + 2}" for i, host in enumerate(hosts)}
        self.hub_ns = f"{base}-hub"
        try:
            self._build(subnet)
        except BaseException:
            self._finalizer()
            raise

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._state.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self, subnet: int) -> None:
        hub = self.hub_ns
        self._add_ns(hub)
        bridge = _ip("-n", hub, "link", "add", "br0", "type", _BRIDGE_KIND, check=False)
        self.bridged = bridge.returncode == 0
        if self.bridged:
            _ip("-n", hub, "link", "set", "br0", "up")
        else:
            forward = _ip(
                "netns",
                "exec",
                hub,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward",
                check=False,
            )
            if forward.returncode != 0:
                raise RuntimeError(
                    "cannot create a bridge nor enable forwarding in the hub namespace: "
                    f"{forward.stderr.strip()}"
                )
        gateway = f"10.231.{subnet}.1"
        for i, host in enumerate(self.hosts):
            ns, addr, port = self._ns[host], self._ip[host], f"v{i}"
            self._add_ns(ns)
            _ip("-n", hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            if self.bridged:
                _ip("-n", hub, "link", "set", port, "master", "br0")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            else:
                _ip("-n", hub, "addr", "add", f"{gateway}/32", "dev", port)
                _ip("-n", ns, "addr", "add", f"{addr}/32", "dev", "eth0")
            _ip("-n", hub, "link", "set", port, "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
            if not self.bridged:
                _ip("-n", hub, "route", "add", f"{addr}/32", "dev", port)
                _ip("-n", ns, "route", "add", f"{gateway}/32", "dev", "eth0", "scope", "link")
                _ip("-n", ns, "route", "add", self.subnet, "via", gateway, "dev", "eth0")

    # -- accessors ---------------------------------------------------------------------------

    def ip(self, host: str) -> str:
        """IPv4 address of ``host`` on the shared segment."""
        return self._ip[host]

    def ns(self, host: str) -> str:
        """Name of ``host``'s network namespace (for ``ip netns exec``)."""
        return self._ns[host]

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this network created (hosts and hub) that is not yet deleted."""
        return list(self._state.namespaces)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    # -- processes ---------------------------------------------------------------------------

    def _argv(self, host: str, cmd: Sequence[str]) -> list[str]:
        if self.closed:
            raise RuntimeError("network is closed")
        if isinstance(cmd, str):
            raise TypeError("cmd must be a list of arguments, not a string")
        return [_ip_bin() or "ip", "netns", "exec", self._ns[host], *cmd]

    def popen(self, host: str, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside ``host``'s namespace; killed (with its process group) on close.

        Keyword arguments go to :class:`subprocess.Popen` unchanged (env, stdout, stderr, text,
        cwd...); ``start_new_session`` defaults to True so the child leads its own group.
        """
        kw.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(self._argv(host, cmd), **kw)
        self._state.popens.append(proc)
        return proc

    def run(self, host: str, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``cmd`` to completion in ``host``'s namespace; kwargs go to ``subprocess.run``."""
        return subprocess.run(self._argv(host, cmd), **kw)

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process in the namespaces and delete them; idempotent.

        Raises RuntimeError listing what could not be cleaned up.
        """
        problems = self._finalizer() if self._finalizer.alive else None
        if problems:
            raise RuntimeError("netns cleanup incomplete: " + "; ".join(problems))

    def __enter__(self) -> Network:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except RuntimeError as cleanup_error:  # don't mask the test's own failure
            warnings.warn(str(cleanup_error), stacklevel=2)
