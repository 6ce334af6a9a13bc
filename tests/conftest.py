"""Shared test settings: one torch thread (two busy-waiting threads on 2 cores are slower), and
``call``: a command's ``main`` run in-process."""

import sys

import pytest
import torch


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
