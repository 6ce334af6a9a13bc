"""``runs/<name>/live.json``, the ServerApp's progress lines and how a run ends.

The federation is driven in-process by :class:`ScriptedGrid`: a grid whose sites answer at
once as the test scripts them (a trained student with given metrics, an error category, or
nothing), so the real ServerApp round loop (``run_federation``) and ``Coordinator`` run
without training anything. moma-server's side of the end (``run_outcome``) is tested on the
live.json the ServerApp wrote.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from moma_protocol import wire
from server import live, transport
from server.live import SitesMissing
from server.results import RunFailed
from server.server_app import _QUIET, _quiet_flower_traceback, run_federation
from tests.helpers import InProcessGrid, tiny_run

NAMES = {10: "hospital-a", 11: "hospital-b", 12: "hospital-c"}


class ScriptedGrid(InProcessGrid):
    """Sites that answer at once: ``behaviour[node]`` is ``"ok"`` (the received student,
    shifted, with ``metrics[node]``), an error category (an error reply) or ``"silent"``.
    ``live_path``: live.json, read back at every train message (what a dashboard would see
    while the site trains)."""

    def __init__(self, behaviour: dict[int, str], metrics: dict[int, dict] | None = None,
                 live_path: Path | None = None) -> None:
        super().__init__()
        self.behaviour, self.metrics = behaviour, metrics or {}
        self.live_path = live_path
        self.seen_live: list[dict] = []

    def get_node_ids(self) -> list[int]:
        return list(self.behaviour)

    def answer(self, node: int, msg: Message) -> Message | None:
        kind = msg.metadata.message_type
        if kind == wire.TRAIN and self.live_path is not None and self.live_path.is_file():
            self.seen_live.append(json.loads(self.live_path.read_text()))
        how = self.behaviour[node]
        if how == "silent":
            return None
        if how != "ok" and kind == wire.TRAIN:
            return wire.category_reply(msg, how)
        return Message(self._content(node, msg), reply_to=msg)

    def _content(self, node: int, msg: Message) -> RecordDict:
        m = self.metrics.get(node, {})
        kind = msg.metadata.message_type
        if kind == wire.TEACHER_STATUS:
            return RecordDict({wire.METRICS: MetricRecord({wire.HAS_TEACHER: 1}),
                               wire.CONFIG: ConfigRecord({wire.SITE_NAME: NAMES[node]})})
        scores = {"accuracy": m.get("accuracy", 0.5), "macro-f1": 0.4, "kappa": 0.3,
                  "loss": 1.0, wire.NUM_EXAMPLES: 20}
        if kind == wire.EVALUATE:
            return RecordDict({wire.METRICS: MetricRecord(scores)})
        state = wire.decode_state(wire.state_blob(msg.content[wire.ARRAYS]))
        sent = {k: v + 0.001 * (node - 9) for k, v in state.items()}
        metrics = {wire.NUM_EXAMPLES: 20 + node, "train-ce": 1.0 + node / 100,
                   "train-kl": 0.0, "train-nce": 2.0, "train-nce-shuffled": 2.5,
                   "train-retrieval": 0.25, wire.TEACHER_CACHED: 1,
                   **{k: v for k, v in m.items() if k != "accuracy"}}
        return RecordDict({wire.ARRAYS: wire.encode_state(sent),
                           wire.METRICS: MetricRecord(metrics),
                           wire.EVAL_METRICS: MetricRecord(scores)})



def federation_run(tmp_path: Path, nodes: list[int], **overrides):
    """Run settings of a small federation of ``nodes`` whose names are registered."""
    registry = tmp_path / "sites.json"
    registry.write_text(json.dumps({str(n): NAMES[n] for n in nodes}))
    values = dict(run_name="live", num_rounds=2, objective="ce", output_dir=str(tmp_path),
                  site_registry=str(registry), min_train_nodes=2, min_available_nodes=2,
                  round_timeout=30.0, fraction_evaluate=1.0)
    values.update(overrides)
    return tiny_run(**values)


def live_json(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "live" / "live.json").read_text())


KEYS = {"run_name", "updated", "state", "round", "num_rounds", "round_started",
        "round_timeout", "connected", "min_nodes", "sites", "waiting_for", "message", "end"}


def test_live_json_follows_a_completed_run(tmp_path, task_identity, caplog):
    run = federation_run(tmp_path, [10, 11])
    grid = ScriptedGrid({10: "ok", 11: "ok"}, live_path=tmp_path / "live" / "live.json")
    with caplog.at_level(logging.INFO, logger="moma"):
        run_federation(grid, run)  # type: ignore[arg-type]
    # while the sites trained, live.json named the round's sites, training, and waited for them
    during = grid.seen_live[0]
    assert KEYS <= set(during)
    assert during["state"] == "training" and during["round"] == 1
    assert during["num_rounds"] == 2 and during["min_nodes"] == 2
    assert during["connected"] == 2 and during["round_timeout"] == 30.0
    assert during["sites"] == [{"node_id": 10, "site_name": "hospital-a", "status": "training"},
                               {"node_id": 11, "site_name": "hospital-b", "status": "training"}]
    assert during["waiting_for"] == ["hospital-a", "hospital-b"]
    assert during["round_started"] <= during["updated"] and during["end"] is None
    assert grid.seen_live[2]["round"] == 2  # round 1's query, round 2's train messages
    done = live_json(tmp_path)
    assert done["state"] == "finished" and done["round"] == 2
    assert done["end"] == {"status": "completed", "reason": "", "exit_code": 0}
    assert [s["status"] for s in done["sites"]] == ["ok", "ok"] and done["waiting_for"] == []
    assert done["message"].startswith("final evaluation") or done["message"].startswith("round")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round 2/2")]
    assert len(lines) == 1 and lines[0].startswith("round 2/2: 2/2 sites done, "), lines


def test_the_round_line_has_test_accuracy_with_an_eval_set(tmp_path, task_identity, caplog):
    run = federation_run(tmp_path, [10, 11], num_rounds=1, eval_source="synthetic:target")
    with caplog.at_level(logging.INFO, logger="moma"):
        run_federation(ScriptedGrid({10: "ok", 11: "ok"}), run)  # type: ignore[arg-type]
    results = json.loads((tmp_path / "live" / "results.json").read_text())
    acc = results["rounds"][0]["server_eval"]["accuracy"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("round 1/1"))
    assert f"test accuracy {acc:.3f}" in line and "2/2 sites done" in line
    assert live_json(tmp_path)["message"].startswith("final evaluation") or \
        f"test accuracy {acc:.3f}" in live_json(tmp_path)["message"]


def test_site_statuses_arrive_as_replies_do(tmp_path, task_identity):
    """A failed and a silent site: live.json says so during and after the round."""
    run = federation_run(tmp_path, [10, 11, 12], num_rounds=1, round_timeout=1.0,
                         min_available_nodes=3, fraction_evaluate=0.0)
    grid = ScriptedGrid({10: "ok", 11: "class-mismatch", 12: "silent"})
    with pytest.raises(RunFailed):
        run_federation(grid, run)  # type: ignore[arg-type]
    done = live_json(tmp_path)
    assert {s["site_name"]: s["status"] for s in done["sites"]} == {
        "hospital-a": "ok", "hospital-b": "failed", "hospital-c": "no reply"}


def test_the_exchange_reports_arrivals_and_who_it_waits_for(task_identity, monkeypatch,
                                                            caplog):
    monkeypatch.setattr(transport, "PROGRESS_EVERY", 0.0)
    grid = ScriptedGrid({10: "ok", 11: "silent"})
    msgs = [Message(RecordDict({wire.CONFIG: ConfigRecord({wire.TEACHER_SHA: ""})}), dst_node_id=n,
                    message_type=wire.TEACHER_STATUS) for n in (10, 11)]
    arrived = []
    with caplog.at_level(logging.INFO, logger="moma"):
        out = transport.exchange(grid, msgs, 0.5, poll=0.1,  # type: ignore[arg-type]
                                 on_reply=lambda n, r: arrived.append(n), name=NAMES.get,
                                 label="round 4")
    assert [n for n, _ in out] == arrived == [10]
    waiting = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert waiting and all(w.startswith("round 4: waiting for hospital-b (1 of 2 replied); ")
                           and "s left of the round timeout" in w for w in waiting), waiting
    assert "hospital-a" not in " ".join(waiting)


def test_a_missing_site_ends_the_run_in_one_line_with_exit_code_3(tmp_path, task_identity,
                                                                   monkeypatch, caplog,
                                                                   capsys):
    monkeypatch.setattr(transport, "PROGRESS_EVERY", 0.0)
    run = federation_run(tmp_path, [10, 11], round_timeout=2.0)
    grid = ScriptedGrid({10: "ok"})  # hospital-b never connects
    with caplog.at_level(logging.INFO, logger="moma"), pytest.raises(live.SitesMissing) as err:
        run_federation(grid, run)  # type: ignore[arg-type]
    assert "not connected: hospital-b" in str(err.value) and "hospital-a" not in str(err.value)
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")]
    assert waiting and "1 of 2 connected, not connected: hospital-b;" in waiting[0]
    assert "s left of the round timeout" in waiting[0]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "not connected: hospital-b" in errors[0].getMessage()
    end = live_json(tmp_path)
    assert end["state"] == "failed" and end["end"]["status"] == "failed"
    assert end["end"]["exit_code"] == live.EXIT_SITES_MISSING == 3
    assert "not connected: hospital-b" in end["end"]["reason"]
    assert end["waiting_for"] == ["hospital-b"] and end["connected"] == 1

    from server.cli import run_outcome

    rc = run_outcome(tmp_path / "live", 0, "finished:failed")
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err_lines) == 1, err_lines
    assert err_lines[0].startswith("error: only 1 site(s) connected") and \
        "not connected: hospital-b" in err_lines[0]


def test_no_round_trained_ends_with_each_sites_category_and_exit_code_4(tmp_path,
                                                                        task_identity,
                                                                        capsys):
    run = federation_run(tmp_path, [10, 11], num_rounds=3)
    grid = ScriptedGrid({10: "class-mismatch", 11: "data-error"})
    with pytest.raises(RunFailed) as err:
        run_federation(grid, run)  # type: ignore[arg-type]
    assert str(err.value) == (
        "no round trained a student: round 1: hospital-a failed (class-mismatch); "
        "hospital-b failed (data-error) (the same in rounds 2-3)")
    end = live_json(tmp_path)["end"]
    assert end == {"status": "failed", "reason": str(err.value), "exit_code": 4}

    from server.cli import run_outcome

    assert run_outcome(tmp_path / "live", 0, "finished:failed") == 4
    out = capsys.readouterr()
    assert out.err.strip() == f"error: {err.value}"


def test_flowers_traceback_of_a_reported_end_is_dropped(caplog):
    """Flower's ServerApp runner logs the exception with its traceback, then its exit-code
    help; after the ServerApp reported the end in one line, both are dropped (the run still
    fails: Flower saw the exception)."""
    from flwr.common.logger import log as flwr_log

    exc = live.SitesMissing("only 1 site(s) connected")
    other = RuntimeError("unexpected")
    _quiet_flower_traceback(exc)
    try:
        with caplog.at_level(logging.DEBUG, logger="flwr"):
            flwr_log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=exc)
            flwr_log(logging.ERROR, "Exit Code: 201\nAn unhandled exception occurred")
            flwr_log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=other)
        kept = [r.getMessage() for r in caplog.records]
        assert kept == ["ServerApp raised an exception"]
        assert caplog.records[0].exc_info[1] is other  # an unexpected error keeps its traceback
    finally:
        logging.getLogger("flwr").removeFilter(_QUIET)


def test_an_unexpected_error_is_recorded_with_exit_code_1(tmp_path, task_identity,
                                                          monkeypatch, capsys):
    run = federation_run(tmp_path, [10, 11], num_rounds=1)

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr("server.server_app.state_digest", broken)
    with pytest.raises(KeyError):
        run_federation(ScriptedGrid({10: "ok", 11: "ok"}), run)  # type: ignore[arg-type]
    end = live_json(tmp_path)["end"]
    assert end["exit_code"] == 1 and end["reason"].startswith("KeyError")

    from server.cli import run_outcome

    assert run_outcome(tmp_path / "live", 0, "finished:failed") == 1


def test_a_live_json_of_an_earlier_run_is_not_this_runs_end(tmp_path, capsys):
    status = live.LiveStatus(tmp_path / "live.json", "x")
    status.end("failed", "only 1 site(s) connected", live.EXIT_SITES_MISSING)
    assert live.read_end(tmp_path / "live.json")["exit_code"] == 3
    later = json.loads((tmp_path / "live.json").read_text())["updated"] + 1
    assert live.read_end(tmp_path / "live.json", since=later) is None

    from server.cli import run_outcome

    assert run_outcome(tmp_path, 0, "finished:failed", since=later) == 1
    assert "did not complete (run status finished:failed)" in capsys.readouterr().err


def test_completed_run_prints_the_summary_not_a_dict(tmp_path, task_identity, capsys):
    run = federation_run(tmp_path, [10, 11], num_rounds=2, eval_source="synthetic:target")
    run_federation(ScriptedGrid({10: "ok", 11: "ok"}), run)  # type: ignore[arg-type]
    capsys.readouterr()

    from server.cli import run_outcome

    assert run_outcome(tmp_path / "live", 0, "finished:completed") == 0
    err = capsys.readouterr().err
    results = json.loads((tmp_path / "live" / "results.json").read_text())
    best = results["final"]
    lines = err.strip().splitlines()
    assert "{" not in err and len(lines) == 7, err
    labels = [ln.split()[0] for ln in lines]
    assert labels == ["best", "accuracy", "macro-F1", "kappa", "rounds", "bytes", "report"]
    starts = {len(ln) - len(ln[len(label):].lstrip()) for ln, label in
              zip(lines, ["best round", "accuracy", "macro-F1", "kappa", "rounds", "bytes",
                          "report"], strict=True)}
    assert len(starts) == 1  # the values are aligned
    assert f"{best['best_round']} of 2" in lines[0]
    assert f"{best['metrics']['accuracy']:.3f}" in lines[1] and "(chance 0.250, 4 classes)" \
        in lines[1]
    assert lines[4].endswith("2 ok, 0 failed")
    down = sum(r["bytes_down"] for r in results["rounds"]) / 1e6
    assert f"{down:.1f} MB down" in lines[5]
    assert lines[6].endswith(str(tmp_path / "live" / "report.md"))


def test_waiting_names_the_registered_sites_not_connected(tmp_path):
    """While waiting, ``waiting_for`` is the registered sites that are not connected."""
    status = live.LiveStatus(tmp_path / "live.json", "x", 3, 60.0, 2, {1: "a", 2: "b"})
    status.waiting(1, [1], 1e12)
    data = json.loads((tmp_path / "live.json").read_text())
    assert KEYS <= set(data) and data["waiting_for"] == ["b"] and data["state"] == "waiting"
    assert isinstance(data["updated"], float) and data["round_started"] is not None
    status.waiting(1, [1, 2], 1e12)
    assert json.loads((tmp_path / "live.json").read_text())["waiting_for"] == []


@pytest.mark.parametrize("exc,code", [
    (lambda: SitesMissing("only 1 site(s) connected after 5 s; not connected: site-b"), 3),
    (lambda: RunFailed("no round trained a student: round 1: a failed (class-mismatch)"), 4),
])
def test_moma_simulate_ends_with_the_runs_exit_code_and_one_line(monkeypatch, capsys, exc,
                                                                 code):
    """moma-simulate exits as moma-server does (3: sites missing, 4: no round trained), with
    one error line: none of its own when the ServerApp already reported the end."""
    from server import simulate

    error = exc()
    monkeypatch.setattr(simulate, "simulate", lambda spec: (_ for _ in ()).throw(error))
    monkeypatch.setattr(sys, "argv", ["moma-simulate", "--runs-dir", "/nonexistent"])
    assert simulate.main() == code
    assert capsys.readouterr().err.count("error:") == 1
    error.moma_reported = True  # the ServerApp's line was logged: no second one
    assert simulate.main() == code
    assert "error:" not in capsys.readouterr().err
