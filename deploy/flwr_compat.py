"""Every internal Flower name the launchers use (the SuperLink process and its credential).

The seam with Flower 1.42 of ``deploy/``, which both sides' commands import and which imports
neither ``server/`` nor ``client/`` (see :mod:`moma_protocol.flwr_compat` for the scheme: pinned
minor version, one compat module per side, names resolved when imported from here,
``tests/test_flwr_compat.py`` checking :data:`INTERNALS` against the installed Flower). The
SuperLink launcher (:mod:`deploy.superlink`) wraps Flower's ``flower-superlink`` in a gate that
re-implements parts of Flower's Fleet API checks; none of that has a public API in Flower 1.42.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moma_protocol.flwr_compat import Internal, lazy_names

if TYPE_CHECKING:  # for readers and type checkers; at run time the names resolve lazily
    from flwr.cli.constant import (  # noqa: F401
        ACCESS_TOKEN_STORE_KEY,
        AUTHN_TYPE_STORE_KEY,
        REFRESH_TOKEN_STORE_KEY,
    )
    from flwr.common.constant import (  # noqa: F401
        HEARTBEAT_PATIENCE,
        SYSTEM_TIME_TOLERANCE,
        TIMESTAMP_HEADER,
        TIMESTAMP_TOLERANCE,
        Status,
    )
    from flwr.proto.fleet_pb2 import ActivateNodeRequest  # noqa: F401
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest  # noqa: F401
    from flwr.supercore.constant import FLEET_HTTP_SIGNATURE_HEADER  # noqa: F401
    from flwr.supercore.credential_store import file_credential_store  # noqa: F401
    from flwr.supercore.primitives.asymmetric import (  # noqa: F401
        bytes_to_public_key,
        verify_signature,
    )
    from flwr.superlink.cli import flower_superlink  # noqa: F401
    from flwr.superlink.config_loader import (  # noqa: F401
        get_federation_manager,
        get_objectstore_linkstate_factories,
    )

_CLI_CONSTANTS = "flwr.cli.constant"
_CONSTANTS = "flwr.common.constant"
_ASYMMETRIC = "flwr.supercore.primitives.asymmetric"
_LOADER = "flwr.superlink.config_loader"
_CREDENTIAL = ("none: the flwr CLI's credential store is written by its own `flwr login`, "
               "which needs Flower's account service")
_AUTH = ("none: Flower authenticates a SuperNode inside its Fleet API servicer; the gate "
         "repeats the check to learn which key activates (deploy.superlink)")
_STATE = "none: a SuperLink's state database has no public API besides the Control API"

INTERNALS: dict[str, Internal] = {
    # -- the Control API credential (write_control_credential) ------------------------------
    "ACCESS_TOKEN_STORE_KEY": Internal(
        _CLI_CONSTANTS, "ACCESS_TOKEN_STORE_KEY",
        why="where the flwr CLI looks up the bearer token it sends to a SuperLink",
        public=_CREDENTIAL),
    "AUTHN_TYPE_STORE_KEY": Internal(
        _CLI_CONSTANTS, "AUTHN_TYPE_STORE_KEY",
        why="selects the flwr CLI's bearer-token plugin for that SuperLink", public=_CREDENTIAL),
    "REFRESH_TOKEN_STORE_KEY": Internal(
        _CLI_CONSTANTS, "REFRESH_TOKEN_STORE_KEY",
        why="a refresh token the plugin expects (never used)", public=_CREDENTIAL),
    "file_credential_store": Internal(
        "flwr.supercore.credential_store.file_credential_store", None,
        why="the flwr CLI's credential file (FLWR_HOME/credentials.yaml); its "
            "CREDENTIAL_FILE_PATH is pointed there for this process's Control API client",
        public=_CREDENTIAL, attrs=("FileCredentialStore", "CREDENTIAL_FILE_PATH")),
    # -- the gate (KeyTracker, authentic_activation, _parse_interval) -----------------------
    "HEARTBEAT_PATIENCE": Internal(
        _CONSTANTS, "HEARTBEAT_PATIENCE",
        why="how long Flower counts a node online after a heartbeat (a key's holder is "
            "protected exactly as long)", public=_AUTH),
    "SYSTEM_TIME_TOLERANCE": Internal(
        _CONSTANTS, "SYSTEM_TIME_TOLERANCE",
        why="Flower's clock tolerance for a signed activation", public=_AUTH),
    "TIMESTAMP_HEADER": Internal(
        _CONSTANTS, "TIMESTAMP_HEADER", why="the signed timestamp's header", public=_AUTH),
    "TIMESTAMP_TOLERANCE": Internal(
        _CONSTANTS, "TIMESTAMP_TOLERANCE", why="the signed timestamp's maximal age",
        public=_AUTH),
    "FLEET_HTTP_SIGNATURE_HEADER": Internal(
        "flwr.supercore.constant", "FLEET_HTTP_SIGNATURE_HEADER",
        why="the activation signature's header", public=_AUTH),
    "bytes_to_public_key": Internal(
        _ASYMMETRIC, "bytes_to_public_key", why="the activating node's key, to verify it",
        public=_AUTH, params=("public_key_bytes",)),
    "verify_signature": Internal(
        _ASYMMETRIC, "verify_signature", why="verifies the activation's signed timestamp",
        public=_AUTH, params=("public_key", "message", "signature")),
    "ActivateNodeRequest": Internal(
        "flwr.proto.fleet_pb2", "ActivateNodeRequest",
        why="an activate-node body: the node's key and heartbeat interval", public=_AUTH,
        attrs=("public_key", "heartbeat_interval")),
    "SendNodeHeartbeatRequest": Internal(
        "flwr.proto.heartbeat_pb2", "SendNodeHeartbeatRequest",
        why="a heartbeat body: the heartbeat interval", public=_AUTH,
        attrs=("heartbeat_interval",)),
    # -- the SuperLink process (_install_gate, main) ----------------------------------------
    "superlink_main": Internal(
        "flwr.superlink.main", None,
        why="its create_app is replaced by one that puts the gate in front of Flower's app "
            "(looked up there when the SuperLink serves)",
        public="none: flower-superlink takes no ASGI middleware (its own authentication needs "
               "Flower's enterprise account service)",
        attrs=("create_app",)),
    "flower_superlink": Internal(
        "flwr.superlink.cli", "flower_superlink",
        why="Flower's flower-superlink command, run in this process after the gate is in place",
        public="the flower-superlink console script (it would not install the gate)"),
    # -- stale runs (retire_stale_runs) -----------------------------------------------------
    "Status": Internal(
        _CONSTANTS, "Status", why="a run's status in the state database (FINISHED)",
        public=_STATE, attrs=("FINISHED",)),
    "get_federation_manager": Internal(
        _LOADER, "get_federation_manager",
        why="the federation manager the state factory needs", public=_STATE),
    "get_objectstore_linkstate_factories": Internal(
        _LOADER, "get_objectstore_linkstate_factories",
        why="opens the SuperLink's state database before the SuperLink starts, to stop the "
            "runs a previous coordinator left unfinished",
        public=_STATE, params=("database", "federation_manager")),
    "LinkState": Internal(
        "flwr.server.superlink.linkstate", "LinkState",
        why="what the state factory returns: get_run_info and stop_run are called on it "
            "(checked here, not imported)", public=_STATE,
        attrs=("get_run_info", "stop_run")),
}

__getattr__ = lazy_names(INTERNALS, __name__)


def point_credential_store(path: Path) -> None:
    """This process's Flower credential store reads ``path`` (the Control API client of
    :mod:`server.registration`): replaces ``file_credential_store.CREDENTIAL_FILE_PATH``."""
    module = importlib.import_module(INTERNALS["file_credential_store"].module)
    module.CREDENTIAL_FILE_PATH = path


def wrap_superlink_app(wrap: Callable[[Any], Any]) -> None:
    """The app Flower's SuperLink creates, passed through ``wrap`` (the gate): replaces
    ``flwr.superlink.main.create_app``, which Flower looks up when the SuperLink serves."""
    module = importlib.import_module(INTERNALS["superlink_main"].module)
    create_app = module.create_app

    def wrapped_create_app(*args: Any, **kwargs: Any) -> Any:
        return wrap(create_app(*args, **kwargs))

    module.create_app = wrapped_create_app
