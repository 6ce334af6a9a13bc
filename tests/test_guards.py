"""The security guards of the commands and of the processes they start, unit level (the slow
deployment tests run them for real: tests/test_secure_deployment.py, tests/test_site_guard.py).

* ``moma-client`` and ``moma-server`` connect over TLS with site authentication, or in plaintext
  only when told ``--insecure``: neither flag, or both, is one ``error:`` line (exit 2) before
  anything starts. The commands run in-process with their process starts replaced: the first
  process one would start raises :class:`Launched` with its command line.
* The site's ClientApp runner (:mod:`client.app_guard`) checks a bundle before Flower installs
  it; the launcher ``moma-client`` puts on the SuperNode's PATH runs it.
* The SuperLink's gate (:mod:`deploy.superlink`) lets other hosts reach the Fleet API only.
"""

from __future__ import annotations

import asyncio
import importlib
import runpy
import sys
from pathlib import Path

import pytest

from deploy.app_bundle import AppRefused
from deploy.federation import Federation
from deploy.runtime import free_port

SERVER = "127.0.0.1:1"


class Launched(Exception):
    """Raised in place of starting a process (the command got past its checks); ``args[0]``
    is its command line."""


@pytest.fixture
def no_launch(monkeypatch):
    """moma-client and moma-server start nothing: their first process raises Launched (no
    port is probed and the site's data is not decoded)."""
    from client import cli as client_cli
    from server import cli as server_cli

    def spawn(cmd, *args, **kwargs):
        raise Launched([str(c) for c in cmd])

    for module in (client_cli, server_cli):
        monkeypatch.setattr(module, "spawn", spawn)
        monkeypatch.setattr(module, "check_port_free", lambda host, port: None)
    monkeypatch.setattr(client_cli, "check_data", lambda args: {})


@pytest.fixture
def fed(tmp_path) -> Federation:
    return Federation.init(tmp_path / "fed", ["127.0.0.1"], 9092, ["site-a"])


def first_process(call, *argv) -> list[str]:
    """The command line of the first process the command starts (it must start one)."""
    with pytest.raises(Launched) as launched:
        r = call(*argv)
        pytest.fail(f"{argv[0]} started nothing (exit {r.returncode}): {r.stderr[-1000:]}")
    return launched.value.args[0]


def refused(call, *argv) -> str:
    """The one ``error:`` line of a command that must refuse before it starts anything."""
    try:
        r = call(*argv)
    except Launched as exc:
        pytest.fail(f"{argv[0]} started {' '.join(exc.args[0][:8])} … instead of refusing")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-1000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-1000:]
    return lines[0]


# -- moma-client: TLS with the kit, or --insecure --------------------------------------------
def client(tmp_path, *extra) -> tuple:
    return ("moma-client", "--data", "synthetic:target", "--cache-dir", tmp_path / "cache",
            "--no-worker", "--clientappio-port", free_port(), *extra)


def test_moma_client_without_kit_or_insecure_refuses_before_connecting(call, no_launch,
                                                                       tmp_path):
    line = refused(call, *client(tmp_path, "--server", SERVER))
    assert "give --kit" in line and "--insecure" in line
    assert not (tmp_path / "cache").exists()  # nothing written either


def test_moma_client_refuses_a_kit_and_insecure_together(call, no_launch, tmp_path, fed):
    line = refused(call, *client(tmp_path, "--kit", fed.kit("site-a"), "--insecure"))
    assert "--insecure and --kit exclude each other" in line


def test_moma_client_with_its_kit_connects_over_tls_with_its_key(call, no_launch, tmp_path,
                                                                 fed):
    cmd = first_process(call, *client(tmp_path, "--kit", fed.kit("site-a")))
    assert Path(cmd[0]).name == "flower-supernode"
    assert "--insecure" not in cmd
    kit = fed.kit("site-a")
    assert cmd[cmd.index("--root-certificates") + 1] == str(kit / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(kit / "node.key")
    assert cmd[cmd.index("--superlink") + 1] == fed.server_address  # the kit's coordinator


def test_moma_client_is_plaintext_only_when_told(call, no_launch, tmp_path):
    cmd = first_process(call, *client(tmp_path, "--insecure", "--server", SERVER))
    assert Path(cmd[0]).name == "flower-supernode" and "--insecure" in cmd
    assert "--root-certificates" not in cmd and "--auth-supernode-private-key" not in cmd


def test_moma_client_check_only_needs_no_kit_and_connects_nothing(call, no_launch, tmp_path):
    r = call(*client(tmp_path, "--check-only"))  # a Launched here fails the test
    assert r.returncode == 0, r.stderr


# -- moma-server: TLS with the federation, or --insecure ---------------------------------------
def server(tmp_path, *extra) -> tuple:
    return ("moma-server", "--runs-dir", tmp_path / "runs", "--name", "x", "--classes", "a,b",
            "--run-config", 'objective="ce"', "--port", free_port(), *extra)


def test_moma_server_without_federation_or_insecure_refuses_before_serving(call, no_launch,
                                                                           tmp_path):
    line = refused(call, *server(tmp_path))
    assert "give --federation" in line and "--insecure" in line
    assert not (tmp_path / "runs" / "x").exists()  # nothing written either


def test_moma_server_refuses_a_federation_and_insecure_together(call, no_launch, tmp_path,
                                                                fed):
    line = refused(call, *server(tmp_path, "--federation", fed.root, "--insecure"))
    assert "--insecure and --federation exclude each other" in line
    assert not (tmp_path / "runs" / "x").exists()


def test_moma_server_with_its_federation_serves_tls_and_authenticates_sites(call, no_launch,
                                                                            tmp_path, fed):
    cmd = first_process(call, *server(tmp_path, "--federation", fed.root))
    assert cmd[1:3] == ["-m", "deploy.superlink"]  # the gated SuperLink
    assert "--insecure" not in cmd and "--enable-supernode-auth" in cmd
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(fed.server_cert)
    assert cmd[cmd.index("--ssl-keyfile") + 1] == str(fed.server_key)
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(fed.ca_cert)


def test_moma_server_is_plaintext_only_when_told(call, no_launch, tmp_path):
    cmd = first_process(call, *server(tmp_path, "--insecure"))
    assert cmd[1:3] == ["-m", "deploy.superlink"] and "--insecure" in cmd
    assert "--enable-supernode-auth" not in cmd and "--ssl-certfile" not in cmd


# -- the site's ClientApp runner -----------------------------------------------------------
@pytest.fixture
def flower_install(monkeypatch):
    """Flower's ClientApp runner with its bundle installer replaced by a recorder; returns the
    runner module and the list of the bundles that reached the installer."""
    import flwr.supernode.runtime.run_clientapp as runner

    installed: list[bytes] = []
    monkeypatch.setattr(runner, "install_from_fab",
                        lambda fab, *args, **kwargs: installed.append(fab))
    return runner, installed


@pytest.fixture
def bundles(tmp_path) -> tuple[bytes, bytes]:
    """This moma-fl's own app bundle, and one that carries code of its own."""
    from flwr.cli.build import build_fab_from_disk

    from server.flwr_app import write_app

    own = build_fab_from_disk(write_app(tmp_path / "own"))
    app = write_app(tmp_path / "foreign")
    (app / "client").mkdir()
    (app / "client" / "client_app.py").write_text("import os; os.system('curl evil')\n")
    return own, build_fab_from_disk(app)


def test_the_guard_checks_a_bundle_before_flower_installs_it(flower_install, bundles,
                                                             tmp_path, monkeypatch):
    from client import app_guard

    runner, installed = flower_install
    log = tmp_path / "logs" / "guard.log"
    monkeypatch.setenv(app_guard.LOG_ENV, str(log))
    own, foreign = bundles
    app_guard._install_guard()
    with pytest.raises(AppRefused, match="files of its own"):
        runner.install_from_fab(foreign, skip_prompt=True)
    assert installed == []  # the foreign bundle never reached Flower's installer
    assert "app refused" in log.read_text() and "files of its own" in log.read_text()
    runner.install_from_fab(own, skip_prompt=True)
    assert installed == [own]  # the site's own passes through


def test_the_launcher_on_the_supernodes_path_runs_flower_behind_the_guard(
        flower_install, bundles, tmp_path, monkeypatch):
    """``flwr-clientapp`` as moma-client writes it: by the time Flower's runner starts, its
    installer refuses a foreign bundle."""
    from client import app_guard

    runner, installed = flower_install
    foreign = bundles[1]
    seen: dict[str, object] = {}

    def flwr_clientapp() -> None:  # stands in for Flower's runner
        seen["argv0"] = sys.argv[0]
        try:
            runner.install_from_fab(foreign, skip_prompt=True)
            seen["foreign"] = "installed"
        except AppRefused:
            seen["foreign"] = "refused"

    monkeypatch.setattr(importlib.import_module("flwr.supernode.cli.flwr_clientapp"),
                        "flwr_clientapp", flwr_clientapp)
    monkeypatch.setattr(app_guard.log, "handlers", [])  # main adds its own
    monkeypatch.setattr(app_guard.log, "propagate", True)
    monkeypatch.delenv(app_guard.LOG_ENV, raising=False)
    launcher = app_guard.write_launcher(tmp_path / "bin")
    monkeypatch.setattr(sys, "argv", [str(launcher)])
    runpy.run_path(str(launcher), run_name="__main__")
    assert seen == {"argv0": "flwr-clientapp", "foreign": "refused"}
    assert installed == []


# -- the SuperLink's gate ----------------------------------------------------------------------
REMOTE, LOCAL = ("192.0.2.7", 40000), ("127.0.0.1", 40000)
BOUND = ("10.9.9.9", 9092)  # the address the SuperLink serves on


class Inner:
    """The app behind the gate: answers 200 and records the paths that reached it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        self.paths.append(scope.get("path", scope["type"]))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


TOKEN = "the-control-credential"
BEARER = [(b"authorization", f"Bearer {TOKEN}".encode())]


def through_gate(path: str, client, kind: str = "http", headers=()
                 ) -> tuple[list[str], list[dict]]:
    """Send one request through SiteGate (its Control API credential: TOKEN); (paths that
    reached the app, messages sent back)."""
    from deploy.superlink import SiteGate

    inner, sent = Inner(), []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": kind, "path": path, "client": client, "server": BOUND,
             "headers": list(headers)}
    asyncio.run(SiteGate(inner, control_token=TOKEN)(scope, receive, send))
    return inner.paths, sent


@pytest.mark.parametrize("path", ["/v1/control/start-run", "/v1/runtime/acquire-task",
                                  "/v1/fleet/../control/start-run", "/docs"])
def test_the_gate_answers_403_to_other_hosts_outside_the_fleet_api(path):
    reached, sent = through_gate(path, REMOTE, headers=BEARER)  # even with the credential
    assert reached == []
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 403
    assert b"forbidden" in sent[1]["body"]
    reached, sent = through_gate(path, REMOTE, "websocket")
    assert reached == [] and sent == [{"type": "websocket.close", "code": 1008}]


def test_the_gate_passes_the_fleet_api_and_this_hosts_requests():
    assert through_gate("/v1/fleet/pull-messages", REMOTE)[0] == ["/v1/fleet/pull-messages"]
    assert through_gate("/health", REMOTE)[0] == ["/health"]
    assert through_gate("/v1/control/start-run", LOCAL, headers=BEARER)[0] == \
        ["/v1/control/start-run"]
    # from this host to the one address the SuperLink is bound to
    assert through_gate("/v1/control/start-run", (BOUND[0], 40000), headers=BEARER)[0] == \
        ["/v1/control/start-run"]
    # the ServerApp's Runtime API from this host needs no Control API credential
    assert through_gate("/v1/runtime/acquire-task", LOCAL)[0] == ["/v1/runtime/acquire-task"]
    assert through_gate("", None, "lifespan")[0] == [""]  # not a request: passed on


def test_the_superlink_launcher_puts_the_gate_in_front_of_flowers_app(monkeypatch, tmp_path):
    """``python -m deploy.superlink``: by the time Flower's command starts, the app Flower
    creates (``flwr.superlink.main.create_app``, looked up when it serves) is gated."""
    import flwr.superlink.cli
    import flwr.superlink.main as flower_main
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from deploy import superlink

    def create_app(*args, **kwargs) -> FastAPI:  # stands in for Flower's app
        app = FastAPI()
        for path in ("/v1/control/start-run", "/v1/fleet/pull-messages"):
            app.add_api_route(path, lambda: {"ok": True}, methods=["POST"])
        return app

    status: dict[tuple[str, str], int] = {}

    def flower_superlink() -> None:  # stands in for Flower's command
        from flwr.superlink.main import create_app as flowers

        app = flowers()
        for name, host in (("remote", REMOTE), ("local", LOCAL)):
            with TestClient(app, client=host) as http:
                for path in ("/v1/control/start-run", "/v1/fleet/pull-messages"):
                    status[name, path] = http.post(
                        path, headers={"authorization": f"Bearer {TOKEN}"}).status_code

    monkeypatch.setattr(flower_main, "create_app", create_app)
    monkeypatch.setattr(flwr.superlink.cli, "flower_superlink", flower_superlink)
    monkeypatch.setattr(superlink.log, "handlers", [])  # main adds its own
    monkeypatch.setattr(superlink.log, "propagate", True)
    monkeypatch.setattr(sys, "argv", ["deploy.superlink", "--insecure"])
    token = tmp_path / "control.token"
    token.write_text(TOKEN + "\n")
    monkeypatch.setenv(superlink.CONTROL_TOKEN_ENV, str(token))
    level = superlink.log.level
    try:
        superlink.main()
    finally:
        superlink.log.setLevel(level)  # main sets INFO
    assert status == {("remote", "/v1/control/start-run"): 403,
                      ("remote", "/v1/fleet/pull-messages"): 200,
                      ("local", "/v1/control/start-run"): 200,
                      ("local", "/v1/fleet/pull-messages"): 200}, status
