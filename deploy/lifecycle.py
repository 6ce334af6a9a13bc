"""No process outlives the command that started it; one command per run folder and port.

* :func:`spawn` starts a child that the kernel kills (SIGKILL) the moment its parent dies,
  whatever killed the parent (``PR_SET_PDEATHSIG``). Flower's own children (SuperExec, the
  ServerApp/ClientApp processes) watch their parents' PIDs and exit when they vanish.
* Every process started on behalf of a command carries ``MOMA_FL_OWNER=<lock file>`` in its
  environment (inherited down the tree). :class:`InstanceLock` holds an ``flock`` on that file
  and starts a reaper (``python -m deploy.lifecycle``, its own session) that shares the lock
  and waits on a pipe from the command: when the command ends, however it ends, the pipe
  closes and the reaper kills whatever still carries the tag (:func:`kill_tagged`), then
  releases the lock. The next owner waits for a reaper still at work, so a ``--resume`` can
  never run beside an orphan.
* :func:`check_port_free` refuses a busy port before anything starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

OWNER_ENV = "MOMA_FL_OWNER"
_PR_SET_PDEATHSIG = 1


class BusyError(RuntimeError):
    """A port or a run folder is already in use."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(cmd: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    """Start ``cmd``; it is killed by the kernel if this process dies (Linux)."""
    return subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent, **kwargs)  # noqa: PLW1509


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`BusyError` if something already listens on ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise BusyError(f"port {port} on {host} is already in use"
                                f"{' (permission denied)' if exc.errno == errno.EACCES else ''}"
                                ": stop what uses it or choose another --port") from None
            raise


def tagged_pids(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``MOMA_FL_OWNER=tag``."""
    needle = f"{OWNER_ENV}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_tagged(tag: str, timeout: float = 60.0) -> list[int]:
    """SIGKILL every process tagged ``tag`` and wait until they are gone; returns their PIDs."""
    pids = tagged_pids(tag)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while tagged_pids(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = tagged_pids(tag)
    if left:
        raise BusyError(f"processes {left} of a previous instance would not stop")
    return pids


class InstanceLock:
    """An exclusive lock on ``path`` (with the holder's PID inside) for one command instance.

    ``acquire`` refuses with :class:`BusyError` naming the holder's PID while another live
    instance holds it; once it is ours, leftovers of a dead previous holder are killed.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path).resolve()
        self.what = what
        self._fd: int | None = None
        self._pipe: int | None = None
        self._reaper: subprocess.Popen | None = None

    @property
    def tag(self) -> str:
        return str(self.path)

    def acquire(self, wait: float = 120.0) -> list[int]:
        """Take the lock, start the reaper; returns PIDs of a dead holder's leftovers killed.

        While a reaper of a dead holder is still cleaning up (the PID in the file is gone but
        the lock is held), wait up to ``wait`` seconds for it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if (holder.isdigit() and pid_alive(int(holder))) or time.monotonic() > deadline:
                    os.close(fd)
                    raise BusyError(f"{self.what} is in use by another running instance "
                                    f"(PID {holder or '?'}; lock {self.path})") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        killed = kill_tagged(self.tag)
        self._start_reaper()
        return killed

    def _start_reaper(self) -> None:
        read_end, self._pipe = os.pipe()
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "deploy.lifecycle", self.tag, str(self._fd)],
            stdin=read_end, pass_fds=(self._fd,), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(read_end)

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` plus the owner tag that marks every descendant as ours."""
        return {**env, OWNER_ENV: self.tag}

    def release(self) -> None:
        """Let the reaper clean up and wait for it (the lock is free when it is done)."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        if self._reaper is not None:
            try:
                self._reaper.wait(90)
            except subprocess.TimeoutExpired:
                pass
            self._reaper = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _reap(tag: str, lock_fd: int) -> None:
    """Reaper: wait until the owner's pipe closes, kill the tagged processes, drop the lock."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while os.read(0, 1024):
        pass
    try:
        kill_tagged(tag)
    finally:
        os.close(lock_fd)


if __name__ == "__main__":
    _reap(sys.argv[1], int(sys.argv[2]))


def stop_groups(procs: Iterable[subprocess.Popen], grace: float = 60.0) -> None:
    """Stop the process groups led by ``procs`` (each started with ``start_new_session``):
    SIGTERM to every group, then SIGKILL to what is left of a group after ``grace`` seconds.
    A group whose leader already exited is signalled too: its children may live on."""
    procs = list(procs)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member of another user: still there
        return True
    return True
