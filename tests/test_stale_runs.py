"""A restarted SuperLink does not hand sites the instructions of a dead coordinator's run.

The SuperLink's state file lives in the run folder, so ``moma-server --resume`` starts its
SuperLink on the state the killed one left: an unfinished run with a round's train messages
that no site pulled yet. Without ``retire_stale_runs`` a reconnecting site would pull and train
that round (spending privacy budget on an update nobody aggregates) and then train it again
for the resumed run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, Status
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.config_loader import (
    get_federation_manager,
    get_objectstore_linkstate_factories,
)
from flwr.superlink.federation.noop_federation_manager import (
    NOOP_FEDERATION_ID,
    NOOP_FLWR_AID,
)
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from deploy.superlink import database_arg, retire_stale_runs


def _state(db: Path):
    return get_objectstore_linkstate_factories(str(db), get_federation_manager())[1].state()


def _abandoned_run(db: Path) -> tuple[int, int]:
    """A state file holding a started run with one undelivered train message for one node."""
    state = _state(db)
    node = state.create_node(NOOP_FLWR_AID, "site", b"site-public-key", 30.0)
    assert state.activate_node(node, 30.0)
    run = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID,
                           "serverapp")
    info = state.get_run_info(run_ids=[run])[0]
    grid = InMemoryGrid(_factory(db))
    grid.set_run(info)
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    try:
        TaskIdentity.run_id, TaskIdentity.node_id = run, SUPERLINK_NODE_ID
        TaskIdentity.task_id = info.primary_task_id
        pushed = grid.push_messages([Message(RecordDict({"config": ConfigRecord({"round": 2})}),
                                             dst_node_id=node, message_type="train")])
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    assert len(list(pushed)) == 1
    return run, node


def _factory(db: Path):
    return get_objectstore_linkstate_factories(str(db), get_federation_manager())[1]


def test_an_abandoned_runs_messages_are_not_delivered_after_a_restart(tmp_path):
    db = tmp_path / "superlink.db"
    run, node = _abandoned_run(db)
    assert retire_stale_runs(str(db)) == [run]
    state = _state(db)
    assert state.get_message_ins(node, None) == []
    assert state.get_run_info(run_ids=[run])[0].status.status == Status.FINISHED
    assert retire_stale_runs(str(db)) == []  # nothing left to stop


def test_without_retiring_the_site_would_pull_the_dead_runs_round(tmp_path):
    """The hazard is real: the same state, not retired, delivers the old train message."""
    db = tmp_path / "superlink.db"
    run, node = _abandoned_run(db)
    delivered = _state(db).get_message_ins(node, None)
    assert [m.metadata.run_id for m in delivered] == [run]
    assert [m.metadata.message_type for m in delivered] == ["train"]


@pytest.mark.parametrize("database", [":flwr-in-memory:", "sqlite://user@db", "absent.db"])
def test_nothing_to_retire_without_a_state_file(tmp_path, database):
    assert retire_stale_runs(str(tmp_path / database) if database == "absent.db"
                             else database) == []
    assert not (tmp_path / "absent.db").exists()


def test_the_database_argument_is_found_in_either_spelling():
    assert database_arg(["--insecure", "--database", "a.db", "--port", "1"]) == "a.db"
    assert database_arg(["--database=b.db"]) == "b.db"
    assert database_arg(["--insecure"]) is None
