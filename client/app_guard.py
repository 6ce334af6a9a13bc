"""The only ClientApp runner a site starts: it refuses any app that is not its own moma-fl.

A Flower SuperNode runs whatever app bundle (FAB) the SuperLink hands it, code included. At a
MoMA-FL site, ``moma-client`` puts this runner first on the SuperNode's ``PATH`` under the name
Flower launches (``flwr-clientapp``). Before anything is unpacked it checks the bundle: only
``pyproject.toml`` (and Flower's ``.info/CONTENT`` manifest), naming exactly this package's
ClientApp/ServerApp components, publisher ``moma-fl`` and the installed moma-fl version. So the
code that runs is the code the site installed; a bundle with code of its own, another
component or another version is refused, and the refusal is written to the site's log.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from client.flwr_compat import INTERNALS
from deploy.app_bundle import AppRefused, check_fab

log = logging.getLogger("moma.client.guard")
#: Where moma-client tells its runner to log refusals (inherited environment, site-local).
LOG_ENV = "MOMA_SITE_GUARD_LOG"

def _record_refusal(reason: str) -> None:
    log.error("app refused: %s", reason)
    path = os.environ.get(LOG_ENV)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} app refused: "
                    f"{reason}\n")


def _check_bundle(fab_content: bytes) -> None:
    """:func:`check_fab`, a refusal written to the site's log before it is raised."""
    try:
        check_fab(fab_content)
    except AppRefused as exc:
        _record_refusal(str(exc))
        raise


def _install_guard() -> None:
    from client.flwr_compat import guard_fab_install

    guard_fab_install(_check_bundle)


def main() -> None:
    """Flower's ``flwr-clientapp``, with the bundle checked before it is installed."""
    from client.flwr_compat import flwr_clientapp

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    _install_guard()
    sys.argv[0] = "flwr-clientapp"
    flwr_clientapp()


#: ``flower-superexec`` as the SuperNode starts it, by bare name: Flower's, except that a stop
#: before it has set up its own signal handling ends it quietly. (Its parent monitor raises
#: SIGINT when the SuperNode exits, e.g. a site that could not join: without this, a superexec
#: still starting up printed a KeyboardInterrupt traceback into the site's one-line error.)
_SUPEREXEC = """#!{python}
import os
import signal
import sys

signal.signal(signal.SIGINT, lambda signum, frame: os._exit(0))
from {superexec.module} import {superexec.attr}  # noqa: E402

sys.argv[0] = "flower-superexec"
sys.exit(flower_superexec())
"""


def write_launcher(bin_dir: Path) -> Path:
    """Write ``bin_dir/flwr-clientapp`` running :func:`main` with this interpreter (and the
    quiet ``flower-superexec`` beside it); returns the first."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "flwr-clientapp"
    path.write_text(f"#!{sys.executable}\nfrom client.app_guard import main\n\nmain()\n")
    path.chmod(0o755)
    superexec = bin_dir / "flower-superexec"
    superexec.write_text(_SUPEREXEC.format(python=sys.executable,
                                           superexec=INTERNALS["flower_superexec"]))
    superexec.chmod(0o755)
    return path


if __name__ == "__main__":
    main()
