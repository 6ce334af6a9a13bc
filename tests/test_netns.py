"""Tests of the network-namespace multi-host harness in tests/netns.py."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import netns
from tests.netns import Network, list_namespaces, require_netns

READY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello from A")
    c.close()
"""

CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        print(c.recv(100).decode(), flush=True)
except OSError as exc:
    print(type(exc).__name__, flush=True)
    sys.exit(3)
"""

# Background daemon that escapes the popen's process group: only `ip netns pids` finds it.
ORPHAN = """
import subprocess, sys
p = subprocess.Popen(["sleep", "1000"], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(p.pid, flush=True)
"""


def _wait_for_line(proc: subprocess.Popen[str], expected: str, timeout: float) -> None:
    """Block until ``proc`` prints ``expected`` on stdout (fail on exit or after ``timeout``)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"{proc.args} exited ({proc.wait()}) before printing {expected!r}")
            if line.strip() == expected:
                return
    pytest.fail(f"{proc.args} did not print {expected!r} within {timeout}s")


def _alive(pid: int) -> bool:
    """True for a running process (a zombie nobody reaped yet counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _root_net_snapshot() -> tuple[str, str, str]:
    def out(*args: str) -> str:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

    links = sorted(line.split(":")[1].strip() for line in out("-o", "link", "show").splitlines())
    return "\n".join(links), out("-4", "-o", "addr", "show"), out("route", "show")


def _start_server(net: Network, host: str, bind: str, port: int) -> subprocess.Popen[str]:
    proc = net.popen(
        host,
        [sys.executable, "-c", SERVER, bind, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_line(proc, "ready", READY_TIMEOUT_S)
    return proc


def _connect(net: Network, host: str, addr: str, port: int) -> subprocess.CompletedProcess[str]:
    return net.run(
        host,
        [sys.executable, "-c", CLIENT, addr, str(port), str(CONNECT_TIMEOUT_S)],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S + CONNECT_TIMEOUT_S,
    )


def test_probe_reasons_without_ip_or_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "_ip_bin", lambda: None)
    reason = netns._probe()
    assert reason is not None and "iproute2" in reason and "`ip`" in reason

    monkeypatch.undo()
    if netns._ip_bin() is not None:
        monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
        reason = netns._probe()
        assert reason is not None and "root" in reason


@pytest.mark.parametrize("topology", ["bridge", "routed"])
def test_three_hosts_reach_each_other_and_cleanup_is_complete(
    topology: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_netns()
    if topology == "routed":  # as on kernels without the bridge module
        monkeypatch.setattr(netns, "_BRIDGE_KIND", "no-such-link-kind")
    before = _root_net_snapshot()
    port, local_port = 9100, 9101
    with Network("t", ["coord", "site1", "site2"]) as net:
        assert net.bridged == (topology == "bridge")
        names = net.namespaces
        assert len(names) == 4 and all(n in list_namespaces() for n in names)
        a = net.ip("coord")
        assert len({net.ip(h) for h in net.hosts}) == 3
        assert a.startswith("10.231.") and net.ns("coord") in names
        assert _root_net_snapshot() == before, "harness touched the root namespace"

        server = _start_server(net, "coord", a, port)
        local = _start_server(net, "coord", "127.0.0.1", local_port)

        for host in ("site1", "site2"):
            got = _connect(net, host, a, port)
            assert got.returncode == 0 and got.stdout.strip() == "hello from A", (host, got)

        # Loopback-bound server: reachable inside A, neither via A's IP nor 127.0.0.1 from B.
        inside = _connect(net, "coord", "127.0.0.1", local_port)
        assert inside.returncode == 0 and inside.stdout.strip() == "hello from A", inside
        for addr in (a, "127.0.0.1"):
            got = _connect(net, "site1", addr, local_port)
            assert got.returncode == 3, (addr, got)
            assert got.stdout.strip() in ("ConnectionRefusedError", "TimeoutError"), got

        orphan = net.run("site2", [sys.executable, "-c", ORPHAN], capture_output=True, text=True)
        orphan_pid = int(orphan.stdout.strip())
        pids = [server.pid, local.pid, orphan_pid]
        assert all(_alive(pid) for pid in pids)
        assert orphan_pid in netns.namespace_pids(net.ns("site2"))

    assert net.closed and net.namespaces == []
    assert not set(names) & set(list_namespaces())
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # the orphan is reaped by init, asynchronously
    assert not [pid for pid in pids if _alive(pid)]
    assert server.returncode is not None and local.returncode is not None
    assert _root_net_snapshot() == before


def test_cleanup_runs_when_the_test_body_fails() -> None:
    require_netns()
    with pytest.raises(RuntimeError, match="boom"), Network("fail", ["a", "b"]) as net:
        names = net.namespaces
        sleeper = net.popen("b", ["sleep", "1000"])
        raise RuntimeError("boom")
    assert not set(names) & set(list_namespaces())
    assert sleeper.returncode is not None and not _alive(sleeper.pid)


def test_sweeper_removes_namespaces_of_dead_creators() -> None:
    require_netns()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{netns.NS_TAG}{dead.pid}-abcdef-stale"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    leftover = subprocess.Popen(
        ["ip", "netns", "exec", stale, "sleep", "1000"], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while leftover.pid not in netns.namespace_pids(stale) and time.monotonic() < deadline:
            time.sleep(0.05)
        with Network("sweep", ["a"]) as net:
            assert stale not in list_namespaces()
            assert net.ns("a") in list_namespaces()
        assert leftover.wait(timeout=10) is not None
    finally:
        if leftover.poll() is None:
            os.killpg(leftover.pid, 9)
            leftover.wait()
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)
