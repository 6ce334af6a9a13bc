"""The Flower app folder that ``moma-server`` hands to ``flwr run``: a pyproject.toml only.

It names the ServerApp/ClientApp of the installed ``moma-fl`` package and lists every
overridable run-config key with its default. It holds no code; every site checks that (see
:mod:`deploy.app_bundle`) before it runs anything, so a site runs only the moma-fl it installed.
"""

from __future__ import annotations

import json
from pathlib import Path

from deploy.app_bundle import COMPONENTS, PUBLISHER, installed_version
from moma_protocol.settings import defaults


def default_run_config() -> dict:
    """Every run-config key with its default, from :mod:`moma_protocol.settings`."""
    return defaults()


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def run_config_arg(values: dict) -> str:
    """``flwr run --run-config`` text for ``values``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def write_app(folder: Path) -> Path:
    """Write ``folder/pyproject.toml``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["[build-system]", 'requires = ["setuptools>=68"]',
             'build-backend = "setuptools.build_meta"', "", "[project]",
             'name = "moma-fl-app"', f'version = "{installed_version()}"',
             'description = "MoMA-FL federation (code from the installed moma-fl package)"',
             'license = "Apache-2.0"', "dependencies = []", "", "[tool.flwr.app]",
             f'publisher = "{PUBLISHER}"', "", "[tool.flwr.app.components]"]
    lines += [f'{k} = "{v}"' for k, v in COMPONENTS.items()]
    lines += ["", "[tool.flwr.app.config]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in default_run_config().items()]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder
