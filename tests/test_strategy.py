"""The coordinator is a Flower Strategy: Flower's own ``Strategy.start`` runs it, and the
ServerApp's round (:meth:`server.round.Coordinator.run_round`, which adds resume, timeouts and
SecAgg+) trains the very same global student with it.

The sites are the real ClientApp handlers in this process behind an in-process grid
(:class:`tests.helpers.SiteGrid`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy

from server.round import FAILED, NO_REPLY, OK, Coordinator
from server.server_app import initial_student
from server.teacher_package import package_teacher
from tests.helpers import SiteGrid, synthetic_sites, tiny_run, tiny_teacher

ROUNDS = 2


def _federation(root: Path, teacher: Path, **overrides):
    """Two fresh synthetic sites (their own caches under ``root``), the run, its grid."""
    root.mkdir(parents=True, exist_ok=True)
    sites = synthetic_sites(root, 2, n=32)
    nodes = {10 + i: site for i, site in enumerate(sites)}
    registry = root / "sites.json"
    registry.write_text(json.dumps({str(n): s["site-name"] for n, s in nodes.items()}))
    settings = dict(run_name="strategy", num_rounds=ROUNDS, output_dir=str(root),
                    teacher_path=str(teacher), site_registry=str(registry), max_steps=2,
                    fraction_evaluate=1.0, round_timeout=60.0)
    run = tiny_run(**{**settings, **overrides})
    names = {n: s["site-name"] for n, s in nodes.items()}
    return run, SiteGrid(nodes, run.to_flat()), names


def _round_one(root: Path):
    """A fresh two-site federation with its teacher, the coordinator and the round-1
    student."""
    teacher = tiny_teacher(root / "teacher.safetensors")
    package = package_teacher(teacher)
    run, grid, names = _federation(root, teacher)
    start, _ = initial_student(run, run.student_architecture(), package)
    return run, grid, Coordinator(grid, run, package, names), start


def test_flower_runs_the_coordinator_as_its_strategy_and_so_does_the_server_app(
        tmp_path, task_identity, caplog):
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    package = package_teacher(teacher)

    run, grid, names = _federation(tmp_path / "flower", teacher)
    start, _ = initial_student(run, run.student_architecture(), package)
    strategy = Coordinator(grid, run, package, names)
    assert isinstance(strategy, Strategy)
    with caplog.at_level(logging.INFO, logger="moma.server"):
        result = strategy.start(grid, ArrayRecord(start), num_rounds=ROUNDS, timeout=60)
    assert any("strategy: fedavg" in r.getMessage() for r in caplog.records)  # summary()

    assert len(grid.train_metrics) == 2 * ROUNDS  # both sites trained in both rounds
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert all(m["train-loss"] > 0 and m["num-examples"] == 64
               for m in result.train_metrics_clientapp.values())
    # the final student is scored by the sites once, after the last round
    assert sorted(result.evaluate_metrics_clientapp) == [ROUNDS]
    final_eval = dict(result.evaluate_metrics_clientapp[ROUNDS])
    assert 0.0 <= final_eval["accuracy"] <= 1.0
    flower_state = result.arrays.to_torch_state_dict()
    assert set(flower_state) == set(start)
    assert any(not torch.equal(flower_state[k], start[k]) for k in start)

    # the ServerApp's driver of the same methods, on fresh sites: the very same student
    run, grid, names = _federation(tmp_path / "server-app", teacher)
    coordinator = Coordinator(grid, run, package, names)
    state = start
    for rnd in range(1, ROUNDS + 1):
        state, report = coordinator.run_round(rnd, state)
        assert [s.status for s in report.sites] == [OK, OK]
    differ = [k for k in state if not torch.equal(state[k], flower_state[k])]
    assert differ == []
    metrics, per_site, down, up = coordinator.evaluate(ROUNDS, state, sorted(names))
    assert metrics == final_eval
    assert set(per_site) == {"10", "11"} and down > 0 and up > 0


def test_a_failed_round_gives_flower_no_arrays_and_keeps_the_report(tmp_path, task_identity):
    """No reply (a site that never answers) is a failed round: ``aggregate_train`` returns no
    arrays, so Flower's loop keeps the global student; the report says why per site."""
    run, grid, coordinator, start = _round_one(tmp_path)
    messages = coordinator.configure_train(1, ArrayRecord(start), ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in messages) == [10, 11]
    replies = grid.send_and_receive(messages[:1])  # the second site's reply never comes
    arrays, metrics = coordinator.aggregate_train(1, replies)
    assert arrays is None and metrics is not None and metrics["num-examples"] == 32
    report = coordinator.report
    assert report is not None and report.failed
    assert {s.site_name: s.status for s in report.sites} == {"site-0": OK, "site-1": NO_REPLY}
    assert coordinator.configure_evaluate(1, ArrayRecord(start), ConfigRecord(), grid) == []


def test_replies_are_matched_to_the_messages_of_the_round_that_sent_them(tmp_path,
                                                                        task_identity):
    run, grid, coordinator, start = _round_one(tmp_path)
    with pytest.raises(ValueError, match="round 1 was not configured"):
        coordinator.aggregate_train(1, [])
    stale = grid.send_and_receive(
        coordinator.configure_train(1, ArrayRecord(start), ConfigRecord(), grid))
    coordinator.aggregate_train(1, [])  # round 1 ends with no reply at all
    assert all(s.status == NO_REPLY for s in coordinator.report.sites)
    coordinator.configure_train(2, ArrayRecord(start), ConfigRecord(), grid)
    arrays, _ = coordinator.aggregate_train(2, stale)  # round 1's replies, late
    assert arrays is None
    assert all(s.status == NO_REPLY for s in coordinator.report.sites)
    assert FAILED not in {s.status for s in coordinator.report.sites}


def test_a_secure_aggregation_run_is_not_handed_to_flowers_loop(tmp_path, task_identity):
    """SecAgg+ is several exchanges per round; Flower's one-exchange loop would send plain
    train messages. ``configure_train`` refuses; the ServerApp's ``run_round`` runs it."""
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    run, grid, names = _federation(tmp_path, teacher, secagg="secaggplus", objective="ce",
                                   fraction_evaluate=0.0)
    coordinator = Coordinator(grid, run, None, names)
    with pytest.raises(ValueError, match="secure-aggregation"):
        coordinator.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(),
                                    grid)
    assert grid.train_metrics == []  # nothing was sent


def test_a_reply_in_another_sites_name_is_not_counted(tmp_path, task_identity):
    """A site that answers another site's message (its reply names the other message, but
    comes from itself) does not train for that site: the SuperLink refuses such a reply, and
    so does the strategy, should one reach it."""
    run, grid, coordinator, start = _round_one(tmp_path)
    messages = coordinator.configure_train(1, ArrayRecord(start), ConfigRecord(), grid)
    to_10, to_11 = sorted(messages, key=lambda m: m.metadata.dst_node_id)
    (reply_11,) = grid.send_and_receive([to_11])  # site 11 trains and answers its own message
    grid.push_messages([to_10])  # site 10's message gets an id; its own reply is thrown away
    grid.replies.clear()
    reply_11.metadata.__dict__["_reply_to_message_id"] = to_10.metadata.message_id
    arrays, _ = coordinator.aggregate_train(1, [reply_11])
    assert arrays is None
    assert {s.site_name: s.status for s in coordinator.report.sites} == \
        {"site-0": NO_REPLY, "site-1": NO_REPLY}
