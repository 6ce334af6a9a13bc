"""A site refuses an app bundle that is not its installed moma-fl, live: a real SuperLink (the
project's gated launcher), a real ``moma-client`` SuperNode, and a foreign app with code of its
own submitted by whoever holds the coordinator's loopback (a malicious coordinator)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deploy.lifecycle import stop_groups
from deploy.runtime import flower_env, free_port, wait_for_port
from deploy.superlink import CONTROL_TOKEN_ENV, write_control_credential

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CEILING = 300.0

FOREIGN_APP = textwrap.dedent('''
    """A foreign app: its ClientApp would write a marker file at the site."""
    import os
    from pathlib import Path

    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    if os.environ.get("SITE_MARKER"):  # only at the site: importing is already running code
        Path(os.environ["SITE_MARKER"]).write_text("imported")
    client = ClientApp()
    server = ServerApp()


    @client.query()
    def steal(msg, context):
        Path(os.environ["SITE_MARKER"]).write_text(str(dict(context.node_config)))
        return Message(RecordDict({"config": ConfigRecord(
            {k: str(v) for k, v in context.node_config.items()})}), reply_to=msg)


    @server.main()
    def main(grid: Grid, context) -> None:
        import time
        deadline = time.time() + 900
        while not list(grid.get_node_ids()) and time.time() < deadline:
            time.sleep(1)
        nodes = list(grid.get_node_ids())
        msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
        for reply in grid.send_and_receive(msgs, timeout=600):
            print("REPLY", reply.has_error(), reply.error.reason if reply.has_error() else "")
''')


def foreign_app(root: Path) -> Path:
    app = root / "foreign"
    app.mkdir()
    (app / "evil_app.py").write_text(FOREIGN_APP)
    (app / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "innocent-app"
        version = "1.0.0"
        dependencies = []
        [tool.flwr.app]
        publisher = "someone"
        [tool.flwr.app.components]
        serverapp = "evil_app:server"
        clientapp = "evil_app:client"
    '''))
    return app


def wait_for(condition, what: str, timeout: float = CEILING) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_foreign_app_is_refused_and_logged_at_the_site(tmp_path):
    port = free_port()
    home = tmp_path / "coord-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = "127.0.0.1:{port}"\n'
        'insecure = true\n')
    env = flower_env(home)
    # the gate closes the Control API to anyone without moma-server's credential; this test
    # plays the coordinator's own account submitting a foreign app, so it holds it
    token = write_control_credential(home, f"127.0.0.1:{port}")
    marker = tmp_path / "marker"
    procs: list[subprocess.Popen] = []
    log = open(tmp_path / "link.log", "wb")
    site_log = open(tmp_path / "site.log", "wb")
    try:
        link = subprocess.Popen(
            [sys.executable, "-m", "deploy.superlink", "--insecure", "--port", str(port),
             "--database", str(tmp_path / "db.sqlite"),
             "--disable-runtime-dependency-installation"],
            env={**env, CONTROL_TOKEN_ENV: str(token)}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        procs.append(link)
        wait_for_port("127.0.0.1", port, CEILING, link)
        site_env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "SITE_MARKER": str(marker)}
        cache = tmp_path / "site"
        site = subprocess.Popen(
            [str(BIN / "moma-client"), "--insecure", "--server", f"127.0.0.1:{port}",
             "--data", "synthetic:target", "--n", "16", "--cache-dir", str(cache),
             "--clientappio-port", str(free_port())],
            env=site_env, stdout=site_log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(site)
        wait_for(lambda: "Activated node_id" in (tmp_path / "link.log").read_text(),
                 "the site to connect")
        run = subprocess.run([str(BIN / "flwr"), "run", str(foreign_app(tmp_path)), "c",
                              "--stream"], env=env, capture_output=True, text=True,
                             timeout=CEILING)
        guard_log = cache / "logs" / "guard.log"
        wait_for(guard_log.is_file, "the site's refusal to be logged")
        text = guard_log.read_text()
        assert "app refused" in text and "files of its own" in text
        assert not marker.exists(), "the foreign app's code ran at the site"
        # the foreign ServerApp got the site's answer to its query, and it was an error (the
        # SuperNode's reply when its ClientApp runner fails; ServerApp prints are streamed)
        replies = [ln for ln in run.stdout.splitlines() if "REPLY" in ln]
        assert replies and all("REPLY True" in ln for ln in replies), \
            run.stdout[-3000:] + run.stderr[-2000:]
        assert "data-path" not in run.stdout + run.stderr
        assert site.poll() is None, "the site must keep serving after a refusal"
    finally:
        stop_groups(procs)
        log.close()
        site_log.close()
