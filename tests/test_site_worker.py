"""The site's warm worker: a real worker process on a real Unix socket, driven through the
site's own ClientApp handlers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

import client.client_app as site_app
from client import site_worker
from moma_protocol import wire
from server.teacher_package import TeacherPackage, package_teacher
from tests.helpers import tiny_run, tiny_teacher
from tests.test_protocol import _wire, instruction

ROOT = Path(__file__).resolve().parents[1]
CEILING = 600.0  # a busy machine: the worker imports torch and timm before it listens


class Worker:
    def __init__(self, socket: Path, log: Path, parent_pid: int | None = None) -> None:
        self.socket, self.log = socket, log
        cmd = [sys.executable, "-m", "client.site_worker", "--socket", str(socket)]
        if parent_pid is not None:
            cmd += ["--parent-pid", str(parent_pid)]
        # one torch thread, as in this test process (conftest): same thread count, same sums
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=open(log, "wb"), env=env)

    def wait_ready(self) -> int:
        deadline = time.time() + CEILING
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                return site_worker.call(str(self.socket), {"op": "ping"}, {})[0]["pid"]
            except site_worker.WorkerUnavailable:
                time.sleep(0.5)
        raise AssertionError("the worker did not come up: " + self.log.read_text())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)

    def mark(self) -> None:
        """From here on :meth:`log_since_mark` shows only what the worker logs next."""
        self._offset = self.log.stat().st_size

    def log_since_mark(self) -> str:
        return self.log.read_bytes()[getattr(self, "_offset", 0):].decode(errors="replace")


@pytest.fixture(scope="module")
def _shared_worker(tmp_path_factory):
    """One worker for the module (it loads torch and timm once, as at a site)."""
    folder = Path(os.path.realpath(tmp_path_factory.mktemp("w")))
    w = Worker(folder / "worker.sock", folder / "worker.log")
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()


@pytest.fixture
def worker(_shared_worker):
    """The module's worker, still serving, its log read from this test's start."""
    assert _shared_worker.proc.poll() is None, _shared_worker.log.read_text()
    _shared_worker.mark()
    return _shared_worker


def _context(node: dict, run: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run)


def _node(cache: Path, **extra) -> dict:
    return {"data-path": "synthetic:target", "cache-dir": str(cache), "site-index": 0,
            "num-sites": 2, "n": 32, "site-name": "site-a", "device": "cpu", **extra}


def _first_train_message(teacher: TeacherPackage):
    config = ConfigRecord({wire.SERVER_ROUND: 1, wire.TEACHER_SHA: teacher.sha256,
                           wire.EVALUATE_FLAG: True})
    return instruction(wire.TRAIN, RecordDict({wire.ARRAYS: wire.encode_state(_wire()),
                                               wire.CONFIG: config, **teacher.records()}))


def test_a_round_on_the_worker_equals_the_round_in_process(worker, tmp_path):
    teacher = package_teacher(tiny_teacher(tmp_path / "teacher.safetensors"))
    run = tiny_run().to_flat()
    msg = _first_train_message(teacher)
    remote = site_app.train(msg, _context(_node(tmp_path / "w", **{
        site_worker.NODE_KEY: str(worker.socket)}), run))
    local = site_app.train(msg, _context(_node(tmp_path / "p"), run))
    assert not remote.has_error() and not local.has_error()
    assert "train handled" in worker.log_since_mark()  # the worker did it, not this process
    a, b = (wire.decode_state(wire.state_blob(r.content[wire.ARRAYS])) for r in (remote, local))
    assert list(a) == list(b)  # same names, same order
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ma, mb = dict(remote.content[wire.METRICS]), dict(local.content[wire.METRICS])
    for m, reply in ((ma, remote), (mb, local)):  # timings differ; each is reported
        assert m.pop("train-time-s") > 0
        # the time spent scoring the incoming student, when the site scored it
        assert (wire.EVAL_TIME in m) == (wire.EVAL_METRICS in reply.content)
        assert m.pop(wire.EVAL_TIME, 0.0) >= 0
    assert ma == mb
    assert dict(remote.content[wire.EVAL_METRICS]) == dict(local.content[wire.EVAL_METRICS])
    # the teacher it carried is in the worker's site cache, as it would be in-process
    assert (tmp_path / "w" / "teachers" / f"{teacher.sha256}.safetensors").is_file()
    # final evaluation goes the same way
    ev = instruction(wire.EVALUATE, RecordDict({wire.ARRAYS: wire.encode_state(_wire())}))
    ra = site_app.evaluate(ev, _context(_node(tmp_path / "w", **{
        site_worker.NODE_KEY: str(worker.socket)}), run))
    rb = site_app.evaluate(ev, _context(_node(tmp_path / "p"), run))
    assert dict(ra.content[wire.METRICS]) == dict(rb.content[wire.METRICS])
    assert worker.log_since_mark().count("evaluate handled") == 1


def test_a_failure_on_the_worker_is_answered_by_category_only(worker, tmp_path):
    secret = str(tmp_path / "slides-of-patient-0042")
    node = _node(tmp_path / "w", **{"data-path": secret,
                                    site_worker.NODE_KEY: str(worker.socket)})
    ev = instruction(wire.EVALUATE, RecordDict({wire.ARRAYS: wire.encode_state(_wire())}))
    reply = site_app.evaluate(ev, _context(node, tiny_run().to_flat()))
    assert reply.has_error() and reply.error.reason == "data-error"
    assert secret not in str(reply.error.reason)
    log = worker.log_since_mark()
    assert "Traceback" in log and "patient-0042" in log  # the details stay at the site
    # the worker is still serving
    assert site_worker.call(str(worker.socket), {"op": "ping"}, {})[0]["pid"] == worker.proc.pid


def test_without_a_reachable_worker_the_site_does_the_work_itself(tmp_path, caplog):
    run = tiny_run(objective="ce").to_flat()
    config = ConfigRecord({wire.SERVER_ROUND: 1, wire.TEACHER_SHA: "", wire.EVALUATE_FLAG: False})
    msg = instruction(wire.TRAIN, RecordDict({wire.ARRAYS: wire.encode_state(_wire()),
                                              wire.CONFIG: config}))
    node = _node(tmp_path / "c", **{site_worker.NODE_KEY: str(tmp_path / "gone.sock")})
    with caplog.at_level("WARNING", logger="moma.client"):
        reply = site_app.train(msg, _context(node, run))
    assert not reply.has_error(), reply.error
    assert reply.content[wire.METRICS][wire.NUM_EXAMPLES] > 0
    assert any("doing the work in this process" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_use_the_worker(worker):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become "nobody", then try the socket
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                site_worker.call(str(worker.socket), {"op": "ping"}, {})
                os.write(write, b"served")
            except site_worker.WorkerUnavailable as exc:
                os.write(write, f"refused {exc}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    answer = os.read(read, 4096).decode()
    os.close(read)
    assert answer.startswith("refused"), answer
    # and the owner still can
    assert site_worker.call(str(worker.socket), {"op": "ping"}, {})[0]["pid"]


def test_the_worker_leaves_with_the_process_that_started_it(tmp_path):
    folder = Path(os.path.realpath(tmp_path))
    starter = (f"import subprocess, sys, time\n"
               f"p = subprocess.Popen([sys.executable, '-m', 'client.site_worker', "
               f"'--socket', {str(folder / 'w.sock')!r}, '--parent-pid', str(__import__('os')"
               f".getpid())])\nprint(p.pid, flush=True)\ntime.sleep(3600)\n")
    parent = subprocess.Popen([sys.executable, "-c", starter], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    try:
        deadline = time.time() + CEILING
        while not (folder / "w.sock").exists():
            assert time.time() < deadline
            time.sleep(0.5)
        parent.kill()
        parent.wait(60)
        while Path(f"/proc/{pid}").exists() and \
                Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            assert time.time() < deadline, "the worker outlived its parent"
            time.sleep(0.5)
        assert not (folder / "w.sock").exists()
    finally:
        parent.kill()
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_a_socket_path_too_long_is_refused(tmp_path):
    with pytest.raises(ValueError, match="too long"):
        site_worker.serve(tmp_path / ("x" * 120) / "w.sock")


def test_a_fresh_clientapp_process_without_a_worker_trains(tmp_path):
    """As Flower runs it: a new process that has not loaded torch handles a train message."""
    (tmp_path / "student.safetensors").write_bytes(wire.encode_blob(_wire()))
    (tmp_path / "run.json").write_text(json.dumps(tiny_run(objective="ce").to_flat()))
    script = f"""
import json, sys, time
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
import client.client_app as site_app
from moma_protocol import wire
assert "torch" not in sys.modules, "the ClientApp module loads torch"
arrays = wire.blob_record(open({str(tmp_path / "student.safetensors")!r}, "rb").read())
config = ConfigRecord({{wire.SERVER_ROUND: 1, wire.TEACHER_SHA: "", wire.EVALUATE_FLAG: True}})
meta = Metadata(run_id=1, message_id="m-1", src_node_id=0, dst_node_id=7,
                reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                message_type=wire.TRAIN)
msg = Message(RecordDict({{wire.ARRAYS: arrays, wire.CONFIG: config}}), metadata=meta)
node = {{"data-path": "synthetic:target", "cache-dir": {str(tmp_path / "c")!r}, "n": 32,
        "device": "cpu"}}
run = json.loads(open({str(tmp_path / "run.json")!r}).read())
ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run)
reply = site_app.train(msg, ctx)
assert not reply.has_error(), reply.error
print("examples", reply.content[wire.METRICS][wire.NUM_EXAMPLES])
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=CEILING)
    assert out.returncode == 0 and "examples" in out.stdout, out.stdout + out.stderr


def test_a_malformed_request_leaves_the_worker_serving(worker):
    """A peer that sends garbage (a JSON list as header, a length with no body) is dropped;
    the worker keeps answering."""
    import socket
    import struct

    for raw in (struct.pack(">Q", 2) + b"[]", struct.pack(">Q", 10 ** 9), b"\x00\x01"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(worker.socket))
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""  # no answer, connection closed
    assert site_worker.call(str(worker.socket), {"op": "ping"}, {})[0]["pid"] == worker.proc.pid
    assert worker.proc.poll() is None


def test_the_worker_answers_no_peer_of_another_user(monkeypatch):
    """Second line of defence behind the socket's file mode: SO_PEERCRED."""
    import socket

    served = []
    monkeypatch.setattr(site_worker, "handle", lambda h, p: served.append(h) or ({}, []))
    monkeypatch.setattr(site_worker.os, "getuid", lambda: os.geteuid() + 1)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        site_worker._send(a, {"op": "ping"}, [])
        site_worker._serve_one(b)
        b.close()
        try:
            answer = a.recv(1)
        except ConnectionResetError:  # closed with the request unread: no answer either
            answer = b""
        assert answer == b"" and served == []


def test_a_student_file_cut_short_from_the_coordinator_is_a_config_error(tmp_path):
    """A lying coordinator: the header is intact, the data is not. The site refuses it by
    category (and would not train on garbage)."""
    config = ConfigRecord({wire.SERVER_ROUND: 1, wire.TEACHER_SHA: "", wire.EVALUATE_FLAG: False})
    cut = wire.blob_record(wire.encode_blob(_wire())[:-100])
    msg = instruction(wire.TRAIN, RecordDict({wire.ARRAYS: cut, wire.CONFIG: config}))
    reply = site_app.train(msg, _context(_node(tmp_path / "c"), tiny_run(objective="ce")
                                         .to_flat()))
    assert reply.has_error() and reply.error.reason == "config-error"
