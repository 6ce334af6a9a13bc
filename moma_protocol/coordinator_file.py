"""The coordinator's own settings travel beside the run config, never in it.

Flower sends a run's config to every site. The coordinator's settings
(:class:`moma_protocol.settings.CoordinatorSettings`: the teacher's path, the output folder, the
held-out set, the site registry …) are paths and facts of the coordinator host that no site
needs, so ``moma-server`` writes them to ``runs/<name>/coordinator.json`` (mode 0600) and names
that file in the environment of the SuperLink it starts (:data:`COORDINATOR_ENV`), which
Flower's SuperExec passes on to the ServerApp; the run config submitted with ``flwr run``
carries the sites' settings only. The ServerApp reads the file over its run config
(:func:`server_run_config`). A simulation, whose sites never leave this machine, may keep them
in the run config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moma_core.atomic import atomic_write
from moma_protocol.settings import ConfigError, settings_fields

#: Environment variable naming the coordinator's settings file.
COORDINATOR_ENV = "MOMA_COORDINATOR_SETTINGS"


def coordinator_keys() -> frozenset[str]:
    """The run-config keys of the coordinator's own settings."""
    return frozenset(k for k, (part, _) in settings_fields().items() if part == "coordinator")


def split(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``values`` as (what the sites may see, the coordinator's own settings)."""
    own = coordinator_keys()
    return ({k: v for k, v in values.items() if k not in own},
            {k: v for k, v in values.items() if k in own})


def write(path: Path, coordinator: Mapping[str, Any]) -> Path:
    """Write the coordinator's settings (only its keys; mode 0600, atomically)."""
    unknown = sorted(set(coordinator) - coordinator_keys())
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not a coordinator setting")
    text = json.dumps(dict(coordinator), indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))  # mkstemp: mode 0600
    return path


def server_run_config(run_config: Mapping[str, Any],
                      environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ServerApp's settings: the run config, with the coordinator's file over it when
    :data:`COORDINATOR_ENV` names one (an unreadable or foreign file: one line)."""
    environ = os.environ if environ is None else environ
    flat = dict(run_config)
    name = environ.get(COORDINATOR_ENV, "")
    if not name:
        return flat
    try:
        data = json.loads(Path(name).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{COORDINATOR_ENV}={name}: unreadable coordinator settings "
                          f"({exc})") from None
    if not isinstance(data, dict) or set(data) - coordinator_keys():
        raise ConfigError(f"{name}: not a coordinator settings file")
    flat.update(data)
    return flat
