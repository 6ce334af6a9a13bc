"""Process lifecycle: nothing a command starts outlives it, one instance per folder and port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deploy.lifecycle import BusyError, InstanceLock, check_port_free, tagged_pids

CEILING = 600.0  # generous: a busy 2-core machine


def wait_until(condition, timeout: float = CEILING, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


OWNER = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from deploy.lifecycle import InstanceLock, spawn
    lock = InstanceLock(Path(sys.argv[1]), "test folder")
    lock.acquire()
    env = lock.env(dict(__import__("os").environ))
    # a direct child (dies with us) and a detached grandchild in its own session
    child = spawn([sys.executable, "-c", "import time; time.sleep(600)"], env)
    detached = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env,
                                start_new_session=True)
    print(child.pid, detached.pid, flush=True)
    time.sleep(600)
""")


def start_owner(lock_path: Path) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(lock_path)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=Path(__file__).parents[1])
    line = proc.stdout.readline()
    assert line, "owner process did not start"
    return proc, [int(p) for p in line.split()]


def test_killed_owner_leaves_no_process_and_frees_the_lock(tmp_path):
    lock_path = tmp_path / "run" / ".lock"
    owner, pids = start_owner(lock_path)
    try:
        assert all(alive(p) for p in pids)
        assert set(pids) <= set(tagged_pids(str(lock_path.resolve())))
        # a second instance is refused while the owner lives, naming its PID
        with pytest.raises(BusyError, match=str(owner.pid)):
            InstanceLock(lock_path, "test folder").acquire(wait=1)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(CEILING)
        wait_until(lambda: not any(alive(p) for p in pids), what="children to die")
        lock = InstanceLock(lock_path, "test folder")
        lock.acquire()  # waits for the reaper, then holds the lock
        lock.release()
    finally:
        for p in pids + [owner.pid]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_leftovers_of_a_dead_owner_are_killed_on_acquire(tmp_path):
    """Even without the reaper (e.g. it was killed too), the next owner cleans up first."""
    lock_path = (tmp_path / ".lock").resolve()
    env = {**os.environ, "MOMA_FL_OWNER": str(lock_path)}
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env,
                              start_new_session=True)
    try:
        wait_until(lambda: orphan.pid in tagged_pids(str(lock_path)), what="orphan to start")
        lock = InstanceLock(lock_path, "test folder")
        killed = lock.acquire()
        assert orphan.pid in killed
        orphan.wait(CEILING)
        lock.release()
    finally:
        orphan.kill()


def test_busy_port_is_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BusyError, match=f"port {port}"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again once closed


def test_busy_port_is_one_line_and_exit_2_for_both_commands(call, tmp_path):
    from tests.helpers import tiny_teacher

    teacher = tiny_teacher(tmp_path / "t.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = call("moma-server", "--teacher", teacher, "--insecure", "--port", port,
                      "--runs-dir", tmp_path / "runs", "--name", "busy", "--classes", "a,b")
        site = call("moma-client", "--insecure", "--server", "127.0.0.1:1",
                    "--data", "synthetic:target", "--n", "16", "--cache-dir", tmp_path / "site",
                    "--clientappio-port", port)
    for proc in (server, site):
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors and f"port {port}" in errors[0] and "in use" in errors[0]
        assert "Traceback" not in proc.stderr
        assert "listening" not in proc.stdout + proc.stderr


def test_stop_groups_ends_every_process_of_each_group(tmp_path):
    """A group whose leader already exited is still signalled (its child lives on), and a
    process that ignores SIGTERM is killed after the grace period."""
    import subprocess
    import sys
    import time

    from deploy.lifecycle import stop_groups

    pidfile = tmp_path / "child.pid"
    child = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)")
    leader = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.Popen([sys.executable, "
                               f"'-c', {child!r}])"], start_new_session=True)
    deadline = time.monotonic() + 120
    while not (pidfile.is_file() and pidfile.read_text()):
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.2)
    leader.wait(120)  # the leader is gone; its child ignores SIGTERM
    pid = int(pidfile.read_text())
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
                                start_new_session=True)
    time.sleep(1)
    stop_groups([leader, stubborn], grace=2.0)
    assert stubborn.poll() is not None
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() < deadline, "the orphaned child of the exited leader lives on"
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "gone"
