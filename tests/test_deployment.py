"""Real deployment on loopback: moma-server (SuperLink + ServerApp) and moma-client sites
(SuperNodes) as separate processes talking gRPC; every process is stopped by PID at the end.
"""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deploy.runtime import free_port
from tests.helpers import IMAGE_SIZE, TARGET_CLASSES, tiny_teacher

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SMALL = (f"image-size={IMAGE_SIZE} batch-size=16 queue-size=64 optimizer=\"adamw\" "
         "lr=0.003 augment=\"flip\"")


class Federation:
    """Processes of one test federation, stopped (process groups) when the test ends."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def server(self, teacher: Path, rounds: int, sites: int, timeout: float) -> None:
        self.start("server", [
            str(BIN / "moma-server"), "--teacher", str(teacher), "--name", "dep",
            "--runs-dir", str(self.root / "runs"), "--port", str(self.port), "--insecure",
            "--rounds", str(rounds), "--eval-source", "synthetic:target",
            "--classes", ",".join(TARGET_CLASSES),
            "--eval-sites", str(sites), "--run-config",
            f"{SMALL} min-train-nodes={min(sites, 2)} min-available-nodes={sites} "
            f"round-timeout={timeout}"])

    def site(self, i: int, sites: int, n: int = 48) -> None:
        self.start(f"site-{i}", [
            str(BIN / "moma-client"), "--server", f"127.0.0.1:{self.port}",
            "--data", "synthetic:target", "--site-index", str(i), "--num-sites", str(sites),
            "--n", str(n), "--cache-dir", str(self.root / f"site-{i}"), "--site-name",
            f"site-{i}", "--insecure", "--clientappio-port", str(free_port())])

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def wait_server(self, timeout: float) -> int:
        try:
            return self.procs["server"].wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail("moma-server did not finish:\n" + self.log("server")[-4000:])

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def results(self) -> dict:
        return json.loads((self.root / "runs" / "dep" / "results.json").read_text())

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


@pytest.fixture
def federation(tmp_path):
    fed = Federation(tmp_path)
    yield fed
    fed.stop_all()


def _wait(condition, what: str, timeout: float = 600.0, federation=None) -> None:
    """Wait for ``condition``; fail at once (with its log) if the coordinator has exited."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        server = federation.procs.get("server") if federation is not None else None
        if server is not None and server.poll() is not None:
            pytest.fail(f"moma-server exited ({server.returncode}) while waiting for {what}:\n"
                        + federation.log("server")[-3000:])
        time.sleep(0.5)


def _train_messages(federation: Federation, site: str) -> int:
    return federation.log(site).count("Receiving: train message")


@pytest.mark.timeout(3600)  # its own waits have generous ceilings (a busy machine)
def test_killed_site_and_killed_coordinator_lose_nothing(federation, tmp_path):
    """Three sites over gRPC for three rounds. A site killed mid-round does not stop the round
    and rejoins from its cache; the coordinator SIGKILLed after a round leaves no process
    behind, a second coordinator on its run folder is refused, and ``--resume`` trains each
    remaining round exactly once; a killed site leaves nothing behind either."""
    from deploy.lifecycle import tagged_pids

    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    federation.server(teacher, rounds=3, sites=3, timeout=300)
    # site-2 has enough images that its round-1 work outlasts the wait below (polled every
    # 0.5 s): it stores the teacher first, then decodes its data and trains (48 images: ~1 s)
    for i in range(3):
        federation.site(i, 3, n=600 if i == 2 else 48)
    cached = tmp_path / "site-2" / "teachers"
    # a generous ceiling: three sites and a SuperLink start slowly on a busy 2-core machine
    # the teacher is in the cache once its sidecar is written too (the file comes first: a
    # site killed between the two has no teacher, and is sent it again)
    _wait(lambda: cached.exists() and any(p.with_suffix(".json").exists()
                                          for p in cached.glob("*.safetensors")),
          "site-2 to cache the teacher", timeout=1200, federation=federation)
    federation.kill("site-2")  # dies mid-round: it received the train message
    federation.site(2, 3)  # and comes back, with its cache, for the next round
    results = tmp_path / "runs" / "dep" / "results.json"
    _wait(lambda: results.exists() and len(json.loads(results.read_text())["rounds"]) >= 1,
          "round 1", timeout=1200, federation=federation)

    # -- the coordinator killed ---------------------------------------------------------
    server_tag = str((tmp_path / "runs" / "dep" / ".moma-server.lock").resolve())
    first = federation.procs["server"]
    # hold the run here (rounds take seconds): freeze the ServerApp, so the coordinator is
    # alive but cannot finish before it is killed below (it is let go just before the kill,
    # so that it can notice its SuperLink die, as a running ServerApp does)
    serverapp = [p for p in tagged_pids(server_tag)
                 if b"flwr-serverapp" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert serverapp, "no ServerApp process found"
    for p in serverapp:
        os.kill(p, signal.SIGSTOP)
    # a second coordinator on the same run folder is refused, naming the first one's PID
    second = subprocess.run(
        [str(BIN / "moma-server"), "--teacher", str(teacher), "--name", "dep", "--runs-dir",
         str(tmp_path / "runs"), "--port", str(free_port()), "--insecure", "--resume",
         "--classes", ",".join(TARGET_CLASSES)],
        capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and f"PID {first.pid}" in second.stderr, second.stderr
    children = tagged_pids(server_tag)
    assert len(children) >= 3  # SuperLink, SuperExec, ServerApp, flwr run
    for p in serverapp:
        os.kill(p, signal.SIGCONT)
    os.kill(first.pid, signal.SIGKILL)  # the command only: its children must follow
    first.wait(60)
    _wait(lambda: not any(Path(f"/proc/{p}").exists() for p in children), "orphans to die")
    assert tagged_pids(server_tag) == []
    done = len(json.loads(results.read_text())["rounds"])
    assert done < 3, "the run ended before the coordinator was killed"
    before = {s: _train_messages(federation, s) for s in ("site-0", "site-1")}
    del federation.procs["server"]
    federation.start("server", [*first.args, "--resume"])
    rc = federation.wait_server(1200)
    assert rc == 0, federation.log("server")[-4000:]
    for site, n in before.items():  # exactly one train message per site per resumed round
        assert _train_messages(federation, site) == n + 3 - done, site

    # -- what the three rounds recorded ---------------------------------------------------
    rounds = federation.results()["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    r1, later = rounds[0], rounds[1:]
    status1 = {s["site_name"]: s["status"] for s in r1["sites"].values()}
    assert status1["site-0"] == status1["site-1"] == "ok"
    assert status1["site-2"] in ("no reply", "failed")  # killed: timeout or node unavailable
    assert len(r1["failed_sites"]) == 1
    for entry in later:  # the restarted site-2 trained again, with its cached teacher
        ok = [s for s in entry["sites"].values() if s["status"] == "ok"]
        assert sorted(s["site_name"] for s in ok) == ["site-0", "site-1", "site-2"], entry
    # the teacher crossed the wire once per site (round 1), never again, resume included
    teacher_size = teacher.stat().st_size
    honest1 = [s for s in r1["sites"].values() if s["site_name"] != "site-2"]
    assert all(s["teacher_sent"] and s["bytes_down"] > teacher_size for s in honest1)
    first_down = min(s["bytes_down"] for s in honest1)
    for entry in later:
        assert not any(s["teacher_sent"] for s in entry["sites"].values())
        assert all(s["bytes_down"] < first_down - 0.9 * teacher_size
                   for s in entry["sites"].values())
    # the global student changed each round, and each round began where the last one ended
    for a, b in itertools.pairwise(rounds):
        assert a["start_digest"] != a["end_digest"] and b["start_digest"] == a["end_digest"]
    assert rounds[-1]["server_eval"]["num_examples"] > 0
    assert rounds[-1]["federated_eval"]["accuracy"] >= 0
    assert federation.results()["final"]["best_round"] in (1, 2, 3)
    # each site verified and cached the teacher, and persisted its private state
    for i in range(3):
        site = tmp_path / f"site-{i}"
        assert len(list((site / "teachers").glob("*.safetensors"))) == 1
        assert json.loads((site / "runs" / "dep" / "state.json").read_text())["round"] == 3
        assert "queue.queue_ptr" in load_file(str(site / "runs" / "dep" /
                                                   "objective.safetensors"))

    # -- and a killed site leaves nothing behind; the same command starts it again ----------
    site_tag = str((tmp_path / "site-0" / ".moma-client.lock").resolve())
    assert tagged_pids(site_tag)
    os.kill(federation.procs["site-0"].pid, signal.SIGKILL)
    federation.procs.pop("site-0").wait(60)
    _wait(lambda: tagged_pids(site_tag) == [], "the site's children to die")
    federation.site(0, 3)
    _wait(lambda: "connecting to" in federation.log("site-0"), "the site to restart")
