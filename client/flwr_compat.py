"""Every internal Flower name the site uses, and the code that reaches into Flower.

The site's seam with Flower 1.42 (see :mod:`moma_protocol.flwr_compat` for the scheme: pinned
minor version, one compat module per side, names resolved when imported from here,
``tests/test_flwr_compat.py`` checking :data:`INTERNALS` against the installed Flower). The
rest of ``client/`` imports Flower's public API (``flwr.app``, ``flwr.clientapp``,
``flwr.client.mod``, ``flwr.common``) and, for anything else, this module. Besides the names,
:func:`guard_fab_install` puts the site's bundle check in front of Flower's installer
(:mod:`client.app_guard`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moma_protocol.flwr_compat import SHARED, Internal, lazy_names

if TYPE_CHECKING:  # for readers and type checkers; at run time the names resolve lazily
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict  # noqa: F401
    from flwr.supercore.cli import flower_superexec  # noqa: F401
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # noqa: F401

_RUNNER = "flwr.supernode.runtime.run_clientapp"

INTERNALS: dict[str, Internal] = {
    # -- SecAgg+ (client.secagg_site) -------------------------------------------------------
    "Key": SHARED["Key"],
    "Stage": SHARED["Stage"],
    "fitres_to_recorddict": Internal(
        "flwr.compat.common.recorddict_compat", "fitres_to_recorddict",
        why="the masked-vector stage of flwr.client.mod.secaggplus_mod masks a legacy fit "
            "result, which the site's round returns as a record in that layout",
        public="a SecAgg+ mod for the message API that masks an ArrayRecord: Flower 1.42's "
               "secaggplus_mod reads only the legacy fit result's layout",
        params=("fitres", "keep_input")),
    # -- the ClientApp runner (client.app_guard) --------------------------------------------
    "install_from_fab": Internal(
        _RUNNER, "install_from_fab",
        why="wrapped by guard_fab_install: the bundle the SuperLink sends is checked before "
            "Flower unpacks and installs it",
        public="none: a SuperNode has no hook on the bundles it installs",
        params=("fab_file", "skip_prompt")),
    "flwr_clientapp": Internal(
        "flwr.supernode.cli.flwr_clientapp", "flwr_clientapp",
        why="Flower's flwr-clientapp command, run by the site's launcher after the guard",
        public="the flwr-clientapp console script (it would not run the guard first)"),
    "flower_superexec": Internal(
        "flwr.supercore.cli", "flower_superexec",
        why="Flower's flower-superexec command, which the site's quiet launcher script imports "
            "(client.app_guard writes the import from this entry)",
        public="the flower-superexec console script (it prints a traceback when stopped early)"),
}

__getattr__ = lazy_names(INTERNALS, __name__)


def guard_fab_install(guard: Callable[[bytes], Any]) -> None:
    """Call ``guard(fab_content)`` before Flower's ClientApp runner installs a bundle: an
    exception it raises stops the install. Wraps the runner's ``install_from_fab`` as it is
    now (looked up by the runner when it installs)."""
    import importlib

    runner = importlib.import_module(_RUNNER)
    install = runner.install_from_fab

    def guarded_install(fab_content: bytes, *args, **kwargs):
        guard(fab_content)
        return install(fab_content, *args, **kwargs)

    runner.install_from_fab = guarded_install
