"""Shared test settings: one torch thread (two busy-waiting threads on 2 cores are slower), and
``call``: a command's ``main`` run in-process."""

import os
import sys
import tempfile

import pytest
import torch

# a site's privacy ledger defaults to $XDG_STATE_HOME (client.site_config.default_ledger_path):
# every process the tests start, SuperNodes included, keeps it in a folder of this test session
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="moma-tests-state-")

# `make test` runs the tests that start no simulation engine in pytest-xdist workers with
# `--dist loadgroup`: each unit-test file is one group (its module fixtures are made once, as
# with `--dist loadfile`) and each slow test one group of its own, the longest first, so that no
# worker is left alone with one at the end; a deployed federation spends much of its time
# waiting on processes and polls, time the other workers fill. The tests marked `ray` then run
# one at a time: Ray's raylet gives its agents 15 s to start and exits when they take longer
# (ray-project/ray#65983), which a busy 2-core machine can cause.
LONGEST_FIRST = (
    "tests/test_deployment.py",
    "tests/test_secure_deployment.py",
    "tests/test_distillation.py",
)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    def rank(item) -> tuple[int, int]:
        for i, prefix in enumerate(LONGEST_FIRST):
            if item.nodeid.startswith(prefix):
                return (0, i)
        return (1, 0) if item.get_closest_marker("slow") else (2, 0)

    items.sort(key=rank)  # stable: collection order within each rank
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            slow = item.get_closest_marker("slow") is not None
            item.add_marker(pytest.mark.xdist_group(
                item.nodeid if slow else item.nodeid.split("::", 1)[0]))


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    torch.set_num_threads(1)
    yield


class CommandResult:
    """Exit code, stdout and stderr of a command run in-process."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def call(monkeypatch, capsys):
    """Run a command's ``main`` in-process (fast): same exit code, stdout and stderr as the
    installed script."""
    from client import cli as client_cli
    from moma_core.cli import distill, evaluate, teacher
    from server import cli as server_cli
    from server import simulate

    mains = {"moma-server": server_cli.main, "moma-simulate": simulate.main,
             "moma-distill": distill.main, "moma-teacher": teacher.main,
             "moma-eval": evaluate.main, "moma-client": client_cli.main}

    def run(command: str, *args) -> CommandResult:
        monkeypatch.setattr(sys, "argv", [command, *map(str, args)])
        code = mains[command]()
        out = capsys.readouterr()
        return CommandResult(code, out.out, out.err)

    return run


@pytest.fixture
def task_identity():
    """Messages made outside a Flower process need Flower's task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
