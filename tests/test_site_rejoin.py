"""A site stays up when the coordinator lets it go (a study ends, the coordinator restarts):
``moma-client`` reads its SuperNode's output, ends a SuperNode that Flower left hanging after a
401 on its heartbeat, says so, and connects again. (The same with a real SuperLink and
SuperNodes over two studies: tests/test_site_lifecycle.py.)"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import pytest

from client import cli, supernode
from client.supernode import SupernodeExit, run_supernode

# what Flower 1.42's SuperNode printed when a new study's SuperLink no longer knew its node,
# after which it kept retrying instead of exiting
HANGS_AFTER_401 = """
import sys, time
print("INFO :      SuperNode ID: 1531824666793374060", flush=True)
print("httpx.HTTPStatusError: Client error '401 Unauthorized' for url "
      "'https://127.0.0.1:55113/v1/fleet/send-node-heartbeat'", flush=True)
print("INFO :      SuperNode terminated gracefully.", flush=True)
while True:
    print("WARNING :   Connection attempt failed, retrying in 5.22 seconds", flush=True)
    time.sleep(0.2)
"""
REFUSED = """
print("ERROR :     Failed to activate SuperNode", flush=True)
raise SystemExit(1)
"""


def _run(script: str) -> tuple[SupernodeExit, str, float]:
    out = io.StringIO()
    start = time.monotonic()
    end = run_supernode([sys.executable, "-c", script], dict(os.environ), out=out)
    return end, out.getvalue(), time.monotonic() - start


def test_a_supernode_left_hanging_after_a_401_is_ended_and_counts_as_let_go(monkeypatch):
    monkeypatch.setattr(supernode, "GRACE", 2.0)
    end, text, took = _run(HANGS_AFTER_401)
    # the 401 line alone ends it: the site may stop the SuperNode before it prints "terminated
    # gracefully" (on a busy machine it often does)
    assert end.unauthorised and end.left_on_its_own() and end.rc != 0
    assert "401" in end.reason()
    assert "SuperNode ID" in text  # its output is shown as it comes
    assert took < 120  # ended by the site, not left retrying forever


def test_a_supernode_whose_child_keeps_the_pipe_open_is_still_seen_to_exit():
    """flower-superexec inherits the SuperNode's output and may outlive it: the exit counts."""
    script = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(60)']); print('ERROR : Failed to activate', flush=True);"
              " raise SystemExit(1)")
    end, text, took = _run(script)
    assert end.rc == 1 and "Failed to activate" in text and took < 40


def test_a_refused_supernode_is_not_taken_for_the_end_of_a_study():
    end, text, _ = _run(REFUSED)
    assert end.rc == 1 and not end.left_on_its_own()
    assert "Failed to activate" in text


def test_a_401_on_activation_alone_is_not_a_study_end():
    end, _, _ = _run("print(\"Client error '401 Unauthorized' for url "
                     "'https://x/v1/fleet/activate-node'\", flush=True); raise SystemExit(1)")
    assert not end.left_on_its_own()


def _args(**kw) -> argparse.Namespace:
    base = {"server": "coord:9092", "max_retries": None, "max_wait_time": None,
            "exit_after_study": False}
    return argparse.Namespace(**{**base, **kw})


def _text(capsys) -> str:
    """Everything printed (the console writes to stderr and wraps long lines), on one line."""
    out = capsys.readouterr()
    return " ".join((out.out + out.err).split())


@pytest.fixture
def supernodes(monkeypatch):
    """keep_connected against a scripted series of SuperNode ends; no sleeping."""
    ends: list[SupernodeExit] = []
    monkeypatch.setattr(cli, "run_supernode", lambda cmd, env, **kw: ends.pop(0))
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    return ends


def test_the_site_connects_again_after_each_study_and_says_so(supernodes, capsys):
    supernodes += [SupernodeExit(rc=-15, unauthorised=True, graceful=True),
                   SupernodeExit(rc=0), SupernodeExit(rc=1)]
    assert cli.keep_connected(_args(max_retries=3), ["flower-supernode"], {}) == 2
    text = _text(capsys)
    assert text.count("this site stays up and connects again") == 2, text
    assert "401" in text
    assert "error: could not join" in text
    assert not supernodes  # all three SuperNodes were run


def test_exit_after_study_ends_the_command_when_the_study_ends(supernodes, capsys):
    supernodes += [SupernodeExit(rc=0), SupernodeExit(rc=1)]
    assert cli.keep_connected(_args(exit_after_study=True), ["x"], {}) == 0
    assert "--exit-after-study, so this site stops here" in _text(capsys)
    assert len(supernodes) == 1


def test_a_coordinator_hint_replaces_the_generic_reason(supernodes, capsys):
    supernodes += [SupernodeExit(rc=1, hint="this site's key is already in use elsewhere")]
    assert cli.keep_connected(_args(max_retries=1), ["x"], {}) == 2
    text = _text(capsys)
    assert "error: this site's key is already in use elsewhere" in text
    assert "not registered yet" not in text
