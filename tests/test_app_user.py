"""``moma-server --app-user USER``: the ServerApp runs as an account that cannot read the keys.

Fast: the refusals (unknown user, not root, a teacher USER cannot read) and the run folder's
ownership and modes. Slow (root and the account ``nobody`` needed, skipped with the reason
otherwise): a real federation run on loopback (TLS, site authentication, one real moma-client)
with ``--app-user nobody`` completes; while it runs the SuperExec and the ServerApp are nobody's,
and nobody can open none of the federation's private keys, the Control API credential and the
SuperLink's state; without ``--app-user`` the ServerApp is root's (the uid check can fail).

Where the interpreter lies under a folder ``nobody`` cannot reach (e.g. a pyenv Python in
``/root``), the slow tests run moma-server in a private mount namespace in which that one folder
is replaced by a reachable (0711) one holding only the interpreter's tree.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from deploy import app_user
from deploy.app_user import ROOT_NAMES, AppUser
from deploy.federation import Federation
from deploy.runtime import free_port
from tests.helpers import IMAGE_SIZE, TARGET_CLASSES, tiny_teacher

BIN = Path(sys.executable).parent
USER = "nobody"
SMALL = (f"image-size={IMAGE_SIZE} batch-size=16 queue-size=64 optimizer=\"adamw\" "
         "lr=0.003 augment=\"flip\" min-available-nodes=1 min-train-nodes=1 "
         "round-timeout=600.0")


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        return None


def require_root_and_nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root (moma-server --app-user switches user)")
    pw = _nobody()
    if pw is None:
        pytest.skip(f"needs the account {USER!r}")
    return pw


@pytest.fixture
def open_dir():
    """A folder every account can reach (pytest's tmp_path is 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="moma-app-user-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- fast: refusals --------------------------------------------------------------------------
def test_no_app_user_is_todays_behaviour(tmp_path):
    iso = AppUser(None)
    assert not iso
    iso.check_access(None, "", tmp_path)
    iso.prepare(tmp_path)
    iso.start({}, "127.0.0.1:1", None)
    iso.stop()
    assert iso.superlink_args() == [] and iso.proc is None


def test_unknown_user_is_refused_in_one_line():
    with pytest.raises(ValueError, match="--app-user no-such-moma-user: no such user") as err:
        AppUser("no-such-moma-user")
    assert "\n" not in str(err.value)


def test_app_user_needs_root(monkeypatch):
    name = pwd.getpwuid(os.getuid()).pw_name if os.getuid() != 0 else USER
    if _nobody() is None and os.getuid() == 0:
        pytest.skip(f"needs the account {USER!r}")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    if pwd.getpwnam(name).pw_uid == 0:
        pytest.skip("no unprivileged account to name")
    with pytest.raises(ValueError, match="needs root") as err:
        AppUser(name)
    assert "\n" not in str(err.value)


def test_root_as_app_user_is_refused():
    with pytest.raises(ValueError, match="is root"):
        AppUser("root")


def test_cli_refuses_before_anything_starts(tmp_path):
    out = subprocess.run(
        [str(BIN / "moma-server"), "--insecure", "--app-user", "no-such-moma-user",
         "--classes", "a,b", "--run-config", 'objective="ce"', "--runs-dir",
         str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert [ln for ln in out.stderr.splitlines() if ln.startswith("error:")] == [
        "error: --app-user no-such-moma-user: no such user on this host (create it: useradd "
        "--system --user-group --no-create-home --shell /usr/sbin/nologin "
        "no-such-moma-user)"]
    assert not (tmp_path / "runs").exists()


def _check_access(pw: pwd.struct_passwd, teacher: Path, runs: Path) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom pathlib import Path\nfrom deploy.app_user import AppUser\n"
            "a = sys.argv\n"
            "try:\n    AppUser(a[1]).check_access(Path(a[2]), '', Path(a[3]))\n"
            "except ValueError as exc:\n    print(exc)\n    sys.exit(2)")
    return subprocess.run(_wrap([sys.executable, "-c", code, USER, str(teacher), str(runs)], pw),
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1])


def test_a_teacher_the_app_user_cannot_read_is_refused(open_dir):
    pw = require_root_and_nobody()
    if _blocking_folder(pw) is not None and not shutil.which("unshare"):
        pytest.skip(f"{sys.executable} is out of {USER}'s reach and unshare is missing")
    teacher = tiny_teacher(open_dir / "teacher.safetensors")
    teacher.chmod(0o600)
    out = _check_access(pw, teacher, open_dir / "runs")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout.strip() == (f"--app-user {USER} cannot read or reach {teacher}: give "
                                  f"{USER} access to it (the ServerApp runs as {USER})")
    teacher.chmod(0o644)
    teacher.with_suffix(".json").chmod(0o644)
    out = _check_access(pw, teacher, open_dir / "runs")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_run_folder_is_the_app_users_to_write_and_roots_files_stay_roots(open_dir):
    pw = require_root_and_nobody()
    out = open_dir / "runs" / "r"
    out.mkdir(parents=True)
    (out / "results.json").write_text("{}")  # of an earlier run as root: handed over
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "round-1.safetensors").write_bytes(b"x")
    (out / "superlink.db").write_bytes(b"")
    (out / "superlink.db").chmod(0o644)
    umask = os.umask(0o022)
    try:
        iso = AppUser(USER)
        iso.prepare(out)
        st = out.stat()
        assert (st.st_uid, st.st_gid) == (0, pw.pw_gid)
        assert stat.S_IMODE(st.st_mode) == 0o1775
        assert (out / "results.json").stat().st_uid == pw.pw_uid
        assert (out / "checkpoints" / "round-1.safetensors").stat().st_uid == pw.pw_uid
        for name in ("superlink.db", "superlink.log", "security.jsonl"):
            st = (out / name).stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), name
        secret = (out / "flwr-home" / app_user.SECRET)
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.stat().st_uid == 0
        mine = out / app_user.APP_HOME / app_user.SECRET
        assert mine.read_bytes() == secret.read_bytes() and len(secret.read_bytes()) == 32
        assert (mine.stat().st_uid, stat.S_IMODE(mine.stat().st_mode)) == (pw.pw_uid, 0o400)
        assert iso.superlink_args() == ["--isolation", "process",
                                        "--superexec-auth-secret-file", str(secret)]
        # a name of root's planted by the app user is refused at the next start
        (out / "sites.json").symlink_to("/etc/shadow")
        with pytest.raises(ValueError, match="sites.json: not root's own"):
            AppUser(USER).prepare(out)
    finally:
        os.umask(umask)


def test_root_names_cover_what_moma_server_writes():
    assert {"superlink.db", "superlink.log", "flwr-home", "site-keys.json", "security.jsonl",
            "coordinator.json", ".moma-server.lock"} <= ROOT_NAMES
    assert app_user.APP_HOME not in ROOT_NAMES


# -- slow: real runs -------------------------------------------------------------------------
def _runnable_by(pw: pwd.struct_passwd, python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "0"], user=pw.pw_uid, group=pw.pw_gid,
                              extra_groups=[], env={}, cwd="/", timeout=120).returncode == 0
    except OSError:
        return False


def _blocking_folder(pw: pwd.struct_passwd) -> Path | None:
    """The first folder above the interpreter that ``pw`` cannot pass through, if any."""
    for parent in reversed(Path(os.path.realpath(sys.executable)).parents):
        st = parent.stat()
        if not st.st_mode & stat.S_IXOTH and st.st_uid != pw.pw_uid:
            return parent
    return None


def _wrap(cmd: list[str], pw: pwd.struct_passwd) -> list[str]:
    """``cmd`` in a private mount namespace where the interpreter is reachable by ``pw``."""
    block = _blocking_folder(pw)
    if block is None:
        return cmd
    real = Path(os.path.realpath(sys.executable))
    keep = block / real.relative_to(block).parts[0]
    script = ('set -e; t=$(mktemp -d); mount --bind "$1" "$t"; '
              'mount -t tmpfs -o mode=0711 tmpfs "$2"; mkdir -p "$1"; mount --bind "$t" "$1"; '
              'shift 2; exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            str(keep), str(block), *cmd]


def _probe_python(pw: pwd.struct_passwd) -> str:
    for python in (sys.executable, "/usr/bin/python3"):
        if Path(python).exists() and _runnable_by(pw, python):
            return python
    pytest.skip(f"no Python that {USER} can run outside the test's namespace")


def open_as(pw: pwd.struct_passwd, path: Path) -> str:
    """What happens when ``pw`` opens ``path``: "ok" or the exception's class name."""
    code = ("import sys\ntry:\n    open(sys.argv[1], 'rb').read(1)\n    print('ok')\n"
            "except OSError as e:\n    print(type(e).__name__)")
    out = subprocess.run([_probe_python(pw), "-c", code, str(path)], user=pw.pw_uid,
                         group=pw.pw_gid, extra_groups=[], env={}, cwd="/",
                         capture_output=True, text=True, timeout=120)
    return out.stdout.strip() or out.stderr.strip()


def _tagged(tag: str, name: str) -> dict[int, int]:
    """{pid: real uid} of live processes running ``name`` carrying moma-server's owner tag."""
    found = {}
    needle = f"MOMA_FL_OWNER={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if needle in env and any(a.endswith(name.encode()) for a in argv[:2]):
            found[int(entry.name)] = int(status.split("\nUid:")[1].split()[0])
    return found


class Run:
    """One moma-server with one site on loopback; process groups killed at the end."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HOME": str(root / "home")}
        (root / "home").mkdir()

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=open(self.root / f"{name}.log", "wb"),
                                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(60)

    def watch(self, server: subprocess.Popen, tag: str, timeout: float) -> dict[str, set[int]]:
        """Wait for moma-server to exit; the uids its superexec and ServerApp ran as."""
        seen: dict[str, set[int]] = {"flower-superexec": set(), "flwr-serverapp": set()}
        deadline = time.monotonic() + timeout
        while server.poll() is None:
            assert time.monotonic() < deadline, self.log("server")[-4000:]
            for name, uids in seen.items():
                uids.update(_tagged(tag, name).values())
            time.sleep(0.2)
        return seen


def _teacher(root: Path) -> Path:
    teacher = tiny_teacher(root / "teachers" / "teacher.safetensors")
    for path in (teacher, teacher.with_suffix(".json")):
        path.chmod(0o644)
    return teacher


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_federation_run_with_the_serverapp_as_nobody(open_dir):
    pw = require_root_and_nobody()
    if _blocking_folder(pw) is not None and not shutil.which("unshare"):
        pytest.skip(f"{sys.executable} is out of {USER}'s reach and unshare is missing")
    run = Run(open_dir)
    fed = Federation.init(open_dir / "fed", ["127.0.0.1"], run.port, ["site-a"])
    teacher = _teacher(open_dir)
    signed = subprocess.run([str(BIN / "moma-teacher"), "sign", str(teacher), "--key",
                             str(fed.signing_key)], env=run.env, capture_output=True, text=True,
                            timeout=600)
    assert signed.returncode == 0, signed.stderr[-2000:]
    from moma_core.signature import signature_path

    signature_path(teacher).chmod(0o644)
    runs = open_dir / "runs"
    server = run.start("server", _wrap([
        str(BIN / "moma-server"), "--federation", str(fed.root), "--teacher", str(teacher),
        "--name", "iso", "--runs-dir", str(runs), "--host", "127.0.0.1", "--port",
        str(run.port), "--rounds", "1", "--eval-source", "synthetic:target",
        "--classes", ",".join(TARGET_CLASSES), "--run-config", SMALL, "--app-user", USER,
        "--no-dashboard"], pw))
    try:
        run.start("site", [str(BIN / "moma-client"), "--kit", str(fed.kit("site-a")), "--data",
                           "synthetic:target", "--site-index", "0", "--num-sites", "1", "--n",
                           "48", "--cache-dir", str(open_dir / "cache-a"),
                           "--clientappio-port", str(free_port())])
        out = runs / "iso"
        tag = str((out / ".moma-server.lock").resolve())
        seen = run.watch(server, tag, 1500)
    finally:
        run.close()
    assert server.returncode == 0, run.log("server")[-4000:]
    assert json.loads((out / "results.json").read_text())["rounds"], "no round in results"
    assert seen["flower-superexec"] == {pw.pw_uid}, (seen, run.log("server")[-3000:])
    assert seen["flwr-serverapp"] == {pw.pw_uid}, (seen, run.log("server")[-3000:])
    assert (out / "results.json").stat().st_uid == pw.pw_uid
    # what nobody (the ServerApp's account) cannot open
    secrets_ = [fed.ca_key, fed.server_key, fed.signing_key, out / "flwr-home" / "control.token",
                out / "flwr-home" / "credentials.yaml", out / "flwr-home" / app_user.SECRET,
                out / "superlink.db", out / "superlink.log", out / "site-keys.json"]
    for path in secrets_:
        assert path.exists(), path
        assert open_as(pw, path) == "PermissionError", path
        assert path.stat().st_uid == 0 and not path.stat().st_mode & 0o077, path
    assert open_as(pw, out / "coordinator.json") == "ok"
    assert open_as(pw, out / app_user.APP_HOME / app_user.SECRET) == "ok"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_without_app_user_the_serverapp_is_roots(open_dir):
    require_root_and_nobody()
    run = Run(open_dir)
    teacher = _teacher(open_dir)
    runs = open_dir / "runs"
    server = run.start("server", [
        str(BIN / "moma-server"), "--insecure", "--teacher", str(teacher), "--name", "plain",
        "--runs-dir", str(runs), "--port", str(run.port), "--rounds", "1", "--eval-source",
        "synthetic:target", "--classes", ",".join(TARGET_CLASSES), "--run-config", SMALL,
        "--no-dashboard"])
    try:
        run.start("site", [str(BIN / "moma-client"), "--server", f"127.0.0.1:{run.port}",
                           "--insecure", "--data", "synthetic:target", "--site-index", "0",
                           "--num-sites", "1", "--n", "48", "--site-name", "site-0",
                           "--cache-dir", str(open_dir / "cache"), "--clientappio-port",
                           str(free_port())])
        tag = str((runs / "plain" / ".moma-server.lock").resolve())
        seen = run.watch(server, tag, 1500)
    finally:
        run.close()
    assert server.returncode == 0, run.log("server")[-4000:]
    assert seen["flwr-serverapp"] == {0}, seen
