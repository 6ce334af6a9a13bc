"""docs/deploy.md followed literally: every command in its shell blocks is accepted by the
command's own parser, the coordinator signs the teacher (explicitly, before ``moma-server``) and
gives the required ``--classes``, moma-fl is installed from a wheel built from the sources (it is
on no package index), two sites on one host get their own ports, and the Flower version the
docs name is the installed one."""

from __future__ import annotations

import re
import shlex
from importlib.metadata import version
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[1] / "docs"


def shell_blocks(doc: Path) -> list[list[list[str]]]:
    """The ```bash blocks of ``doc``: each a list of commands (argv, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S)
    return [[shlex.split(line, comments=True)
             for line in block.replace("\\\n", " ").splitlines() if line.strip()]
            for block in blocks]


def commands(name: str) -> list[list[str]]:
    return [argv for block in shell_blocks(DOCS / "deploy.md") for argv in block
            if argv and argv[0] == name]


def parse(argv: list[str]):
    """``argv`` through the parser of its command (an unknown flag exits: the test fails)."""
    from client import cli as client_cli
    from deploy import provision
    from moma_core.cli import teacher
    from server import cli as server_cli

    name, args = argv[0], argv[1:]
    if name == "moma-teacher" and args[:1] == ["sign"]:
        return teacher.sign_parser().parse_args(args[1:])
    parsers = {"moma-server": server_cli.parser, "moma-client": client_cli.parser,
               "moma-teacher": teacher.parser, "moma-deploy": provision.parser}
    return parsers[name]().parse_args(args)


def test_every_moma_command_in_the_walk_through_parses():
    found = [argv for block in shell_blocks(DOCS / "deploy.md") for argv in block
             if argv and argv[0].startswith("moma-")]
    assert {argv[0] for argv in found} >= {"moma-deploy", "moma-teacher", "moma-server",
                                           "moma-client"}
    for argv in found:
        try:
            parse(argv)
        except SystemExit:
            pytest.fail(f"docs/deploy.md: {shlex.join(argv)} is refused by its parser")


def test_moma_server_is_given_the_classes_and_a_signed_teacher():
    """Each ``moma-server`` in the walk-through names ``--classes`` (required), and its teacher
    was signed before, with ``moma-teacher sign`` and the key ``moma-deploy init`` made."""
    from deploy.federation import Federation

    block = next(b for b in shell_blocks(DOCS / "deploy.md")
                 if any(argv[:1] == ["moma-server"] for argv in b))
    init = parse(next(argv for argv in block if argv[:2] == ["moma-deploy", "init"]))
    key = Federation(init.folder, {}).signing_key
    servers = [i for i, argv in enumerate(block) if argv[:1] == ["moma-server"]]
    for i in servers:
        args = parse(block[i])
        assert args.classes, "moma-server without --classes is refused"
        signed = [parse(argv) for argv in block[:i] if argv[:2] == ["moma-teacher", "sign"]]
        assert any(s.teacher == args.teacher and s.key == key for s in signed), \
            f"{args.teacher} is not signed with {key} before moma-server (it refuses it)"


def test_moma_fl_is_installed_from_a_wheel_built_from_the_sources():
    text = (DOCS / "deploy.md").read_text()
    assert "pip wheel" in text  # how the wheel is made
    for block in shell_blocks(DOCS / "deploy.md"):
        for argv in block:
            if argv[:1] == ["pip"] or argv[1:3] == ["-m", "pip"]:
                pip = argv[argv.index("pip") + 1:]
                if pip[:1] in (["install"], ["download"]):
                    assert any(a.endswith(".whl") for a in pip) or "--find-links" in pip, \
                        f"{shlex.join(argv)}: moma-fl is on no package index"


def test_two_sites_on_one_host_get_their_own_ports_and_folders():
    for block in shell_blocks(DOCS / "deploy.md"):
        sites = [parse(argv) for argv in block if argv[:1] == ["moma-client"]]
        kits = {s.kit for s in sites if not s.check_only}
        if len(kits) < 2:
            continue
        running = [s for s in sites if not s.check_only]
        for attr in ("clientappio_port", "cache_dir", "ledger"):
            values = [getattr(s, attr) for s in running]
            assert len(set(values)) == len(values), f"two sites share --{attr}"
        return
    pytest.fail("docs/deploy.md does not show two sites on one host (--clientappio-port)")


@pytest.mark.parametrize("doc", ["deploy.md", "security.md"])
def test_the_flower_version_named_is_the_installed_one(doc):
    installed = ".".join(version("flwr").split(".")[:2])
    named = re.findall(r"Flower (\d+\.\d+)", (DOCS / doc).read_text())
    assert named and set(named) == {installed}, (named, installed)
