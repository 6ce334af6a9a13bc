"""``moma-server --app-user USER``: the ServerApp runs as an account that cannot read the keys.

Without it, Flower's default ``--isolation subprocess`` has the SuperLink start
``flower-superexec``, which starts the ServerApp (``flwr-serverapp``), all as the account running
``moma-server``, which can read the CA key, the server's TLS key and the teacher-signing key.
With ``--app-user USER`` (``moma-server`` must run as root):

* the SuperLink runs with ``--isolation process --superexec-auth-secret-file S``: it starts no
  SuperExec itself, and the Runtime API hands a ServerApp task only to a caller that signs its
  ``acquire-task`` with the secret (a fresh random secret per start: root's copy
  ``flwr-home/superexec.secret`` 0600, the app user's ``app-home/superexec.secret`` 0400);
* ``moma-server`` starts ``flower-superexec`` itself as USER (no supplementary groups, umask
  022), with a minimal environment: ``PATH``, ``FLWR_HOME=HOME=runs/<name>/app-home`` (USER's,
  0700), the coordinator settings file (:mod:`moma_protocol.coordinator_file`, made readable by
  USER's group), the owner tag of :mod:`deploy.lifecycle` (so it and the ServerApp are killed with
  the run) and Flower's offline switches; never ``MOMA_CONTROL_TOKEN_FILE`` nor the site keys.
  It connects to the Runtime API on this host's loopback, over TLS verified with a copy of the
  federation CA's certificate (public) when the run has a federation;
* the run folder becomes ``root:<USER's group>`` mode 1775 (sticky): USER writes the ServerApp's
  results, checkpoints, ``live.json`` and ``tensorboard/`` there, but cannot remove or rename
  root's entries (:data:`ROOT_NAMES`: the SuperLink's database, log, ``flwr-home`` with the
  Control API credential, ``site-keys.json`` …), which ``moma-server`` writes with umask 077.
  Before anything starts, every root entry that exists must be root's, not a link and not a
  second hard link (one line otherwise: a name planted by the app user); entries of the
  ServerApp from a run without ``--app-user`` (``--resume``) are handed to USER.

Checked up front, as USER (one line naming what fails): the interpreter and moma-fl can be run,
the teacher (with its sidecar and signature) and a held-out folder can be read, the runs folder
can be reached. Use a dedicated account with a group of its own (``moma-app``); a shared one such
as ``nobody`` lets every other service of that account into the run folder.
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from deploy.lifecycle import OWNER_ENV, spawn
from deploy.runtime import executable
from moma_protocol.coordinator_file import COORDINATOR_ENV

#: The run folder's entries that are root's (the SuperLink's and moma-server's own files).
ROOT_NAMES = frozenset({
    ".moma-server.lock", "flwr-home", "flwr-app", "superlink.db", "superlink.db-wal",
    "superlink.db-shm", "superlink.db-journal", "superlink.log", "site-keys.json",
    "security.jsonl", "coordinator.json", "sites.json", "app.log"})
#: USER's FLWR_HOME (and HOME) in the run folder.
APP_HOME = "app-home"
SECRET = "superexec.secret"
APP_LOG = "app.log"
#: Flower's switches the app user's processes keep (no telemetry, no update check, offline).
KEEP_ENV = ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL",
            "PYTHONUNBUFFERED")

# Runs as the app user: prints the first path it cannot use. "r": read a file, "x": reach a
# folder, "d": read a folder and everything in it, "m": import a module (found, file readable).
_PROBE = """
import importlib.util, os, sys
def bad(kind, path):
    if kind == "m":
        try:
            spec = importlib.util.find_spec(path)
        except Exception as exc:
            return f"{path} ({type(exc).__name__})"
        if spec is None or (spec.origin and not os.access(spec.origin, os.R_OK)):
            return path
        return None
    if kind == "x":
        return None if os.access(path, os.X_OK) else path
    if kind == "r" or not os.path.isdir(path):
        return None if os.access(path, os.R_OK) else path
    for root, dirs, files in os.walk(path, onerror=lambda e: None):
        if not os.access(root, os.R_OK | os.X_OK):
            return root
        for name in dirs + files:
            full = os.path.join(root, name)
            if not os.access(full, os.R_OK | (os.X_OK if name in dirs else 0)):
                return full
    return None
for spec in sys.argv[1:]:
    found = bad(spec[0], spec[2:])
    if found:
        print(found)
        sys.exit(1)
"""


def add_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--app-user", metavar="USER",
                   help="run the ServerApp as this unprivileged account (moma-server runs as "
                        "root): it cannot read the federation's keys nor the Control API "
                        "credential (docs/security.md); default: as moma-server's own account")


class AppUser:
    """The ServerApp's account, or the absence of one (``--app-user`` not given): then every
    method is a no-op and moma-server behaves as before."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.pw: pwd.struct_passwd | None = None
        self.out_dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        if name is None:
            return
        try:
            self.pw = pwd.getpwnam(name)
        except KeyError:
            raise ValueError(f"--app-user {name}: no such user on this host (create it: "
                             "useradd --system --user-group --no-create-home "
                             f"--shell /usr/sbin/nologin {name})") from None
        if self.pw.pw_uid == 0:
            raise ValueError(f"--app-user {name} is root: name an unprivileged account")
        if os.geteuid() != 0:
            raise ValueError(f"--app-user {name} needs root (to start the ServerApp as {name} "
                             "and keep the keys from it): run moma-server as root, or leave "
                             "--app-user out")

    def __bool__(self) -> bool:
        return self.pw is not None

    @property
    def uid(self) -> int:
        assert self.pw is not None
        return self.pw.pw_uid

    @property
    def gid(self) -> int:
        assert self.pw is not None
        return self.pw.pw_gid

    # -- before anything starts -------------------------------------------------------------
    def check_access(self, teacher: Path | None, eval_source: str, runs_dir: Path) -> None:
        """Refuse (one line naming it) what USER could not use: the interpreter, moma-fl and
        Flower, the teacher and its sidecar and signature, a held-out folder, the runs folder."""
        if not self:
            return
        specs = ["m:server.server_app", "m:flwr"]
        if teacher is not None:
            from moma_core.checkpoint import sidecar_path
            from moma_core.signature import signature_path

            specs += [f"r:{p}" for p in (teacher, sidecar_path(teacher),
                                         signature_path(teacher)) if p.exists()]
        if eval_source and not eval_source.startswith("synthetic:"):
            specs.append(f"d:{Path(eval_source).resolve()}")
        reach = runs_dir.resolve()
        while not reach.exists():
            reach = reach.parent
        specs.append(f"x:{reach}")
        try:
            out = subprocess.run([sys.executable, "-I", "-c", _PROBE, *specs], cwd="/",
                                 env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                 user=self.uid, group=self.gid, extra_groups=[],
                                 capture_output=True, text=True, timeout=120)
        except OSError as exc:
            raise ValueError(f"--app-user {self.name} cannot run {sys.executable} "
                             f"({exc.strerror}): install moma-fl where {self.name} can read "
                             "and run it") from None
        if out.returncode != 0:
            what = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else \
                (out.stderr.strip().splitlines() or ["?"])[-1]
            raise ValueError(f"--app-user {self.name} cannot read or reach {what}: give "
                             f"{self.name} access to it (the ServerApp runs as {self.name})")

    def prepare(self, out_dir: Path) -> None:
        """Make the run folder USER's to write and root's files root's only (see the module
        docstring); from here on this process creates its files with umask 077."""
        if not self:
            return
        self.out_dir = out_dir
        os.umask(0o077)
        for entry in sorted(out_dir.iterdir()):
            st = entry.lstat()
            if entry.name in ROOT_NAMES:
                if (entry.is_symlink() or st.st_uid != 0
                        or (entry.is_file() and st.st_nlink > 1)):
                    raise ValueError(f"{entry}: not root's own (a link, or owned by uid "
                                     f"{st.st_uid}), where moma-server keeps root's files: "
                                     "remove it, then start again")
                if not entry.is_dir():
                    entry.chmod(0o600)
            elif entry.name != APP_HOME:
                _chown_tree(entry, self.uid, self.gid)  # the ServerApp's, e.g. of a root run
        os.chown(out_dir, 0, self.gid)
        out_dir.chmod(0o1775)
        home = out_dir / APP_HOME
        if home.is_symlink() or (home.exists() and not home.is_dir()):
            home.unlink()
        home.mkdir(exist_ok=True)
        _chown_tree(home, self.uid, self.gid)
        home.chmod(0o700)
        secret = secrets.token_bytes(32)
        root_home = out_dir / "flwr-home"
        root_home.mkdir(mode=0o700, exist_ok=True)
        _write_new(root_home / SECRET, secret, 0o600, 0, 0)
        _write_new(home / SECRET, secret, 0o400, self.uid, self.gid)
        # root's and 0600 before USER runs anything (no link planted where root writes)
        for name in ("security.jsonl", "superlink.log", APP_LOG):
            path = out_dir / name
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o600))

    def superlink_args(self) -> list[str]:
        """Extra ``flower-superlink`` arguments: process isolation, the SuperExec secret."""
        if not self:
            return []
        assert self.out_dir is not None
        return ["--isolation", "process", "--superexec-auth-secret-file",
                str(self.out_dir / "flwr-home" / SECRET)]

    # -- the SuperExec, as USER -------------------------------------------------------------
    def start(self, env: dict[str, str], address: str, ca_cert: Path | None) -> None:
        """Start ``flower-superexec`` as USER, connecting to the Runtime API at ``address``
        (TLS with ``ca_cert`` when given); ``env`` is moma-server's own (with the owner tag)."""
        if not self:
            return
        assert self.out_dir is not None
        out_dir, home = self.out_dir, self.out_dir / APP_HOME
        for name in ("coordinator.json", "sites.json"):  # USER reads them, nobody else
            path = out_dir / name
            if path.exists():
                os.chown(path, 0, self.gid)
                path.chmod(0o640)
        tls = ["--insecure"]
        if ca_cert is not None:
            ca = home / "ca.crt"
            _write_new(ca, ca_cert.read_bytes(), 0o444, self.uid, self.gid)
            tls = ["--root-certificates", str(ca)]
        app_env = {"PATH": env["PATH"], "FLWR_HOME": str(home), "HOME": str(home),
                   OWNER_ENV: env[OWNER_ENV]}
        app_env.update({k: env[k] for k in (COORDINATOR_ENV, *KEEP_ENV) if k in env})
        cmd = [executable("flower-superexec"), "--runtime-api-address", address, *tls,
               "--superexec-auth-secret-file", str(home / SECRET)]
        with open(out_dir / APP_LOG, "ab") as log:
            self.proc = spawn(cmd, app_env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, cwd=str(home), user=self.uid,
                              group=self.gid, extra_groups=[], umask=0o022, close_fds=True)

    def stop(self) -> None:
        from deploy.runtime import stop

        stop(self.proc)


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    """chown ``top`` and everything in it, never following a link (``fwalk``, dir fds)."""
    os.chown(top, uid, gid, follow_symlinks=False)
    if top.is_symlink() or not top.is_dir():
        return
    for _, dirs, files, fd in os.fwalk(top, follow_symlinks=False):
        for name in dirs + files:
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)


def _write_new(path: Path, data: bytes, mode: int, uid: int, gid: int) -> None:
    """Write a fresh file (whatever was at ``path`` is removed first; never through a link)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchown(fd, uid, gid)
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)

