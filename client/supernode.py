"""The site's Flower SuperNode process: started, its output shown and read, and how it ended.

``moma-client`` keeps one SuperNode connected for as long as it runs. A SuperNode leaves on its
own when the coordinator ends its study or restarts (Flower 1.42 answers the next heartbeat
with 401 and the SuperNode exits 0, "SuperNode terminated gracefully"): the site then connects
again for the next study instead of ending silently. What the SuperNode printed tells the site
why it left, and the site says so in its log in one line.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from deploy.lifecycle import spawn
from deploy.runtime import stop

#: The SuperLink no longer knows this node: a new study (another state database), a
#: coordinator restarted without its state, or this site's key was revoked. Flower 1.42 logs the
#: 401 of the heartbeat, says "SuperNode terminated gracefully" and then, instead of exiting,
#: keeps retrying with the node ID nobody knows: the site ends that process and starts a fresh
#: SuperNode.
_UNAUTHORISED = re.compile(r"\b401\b.*(send-node-heartbeat|pull-messages|push-messages)", re.I)
_GRACEFUL = "SuperNode terminated gracefully"
#: Seconds a SuperNode that was let go gets to exit before it is killed.
GRACE = 10.0
#: Seconds to read a stopped SuperNode's last lines.
DRAIN = 5.0


@dataclass
class SupernodeExit:
    """How one SuperNode process ended."""

    rc: int
    unauthorised: bool = False  # the coordinator answered 401: it no longer knows this node
    graceful: bool = False  # the SuperNode said it terminated gracefully
    hint: str | None = None  # a sentence for the site's operator (e.g. the key is in use)

    def left_on_its_own(self) -> bool:
        """The coordinator ended the connection (a study ended, a restart): exit code 0, or
        the 401 / graceful-termination lines of a SuperNode the site then stopped."""
        return self.rc == 0 or self.unauthorised or self.graceful

    def reason(self) -> str:
        if self.unauthorised:
            return ("the coordinator no longer knows this site's connection (it ended its "
                    "study, or restarted with a new one; a 401 on the SuperNode's heartbeat)")
        return "the coordinator ended the connection (its study ended, or it restarted)"


def _site_hint(line: str) -> str | None:
    """The coordinator's sentence for this site in a SuperNode line, if any (e.g. its key is
    in use by another SuperNode: a copied kit)."""
    try:
        from deploy.security_events import site_hint
    except ImportError:  # pragma: no cover - older deploy package
        return None
    return site_hint(line)


def run_supernode(cmd: list[str], env: dict[str, str], out=None,
                  start: Callable[..., subprocess.Popen] = spawn) -> SupernodeExit:
    """Run the SuperNode ``cmd`` (started with ``start``) until it exits, copying its output to
    ``out`` (stdout) line by line and reading it; the process is stopped if this call is
    interrupted.

    The output is read in a thread and the process itself is waited for: the SuperNode's own
    child (``flower-superexec``) inherits the pipe and may outlive it, so the end of its output
    is not the end of the SuperNode.
    """
    out = out or sys.stdout
    proc = start(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                 bufsize=1, errors="replace")
    result = SupernodeExit(rc=-1)
    ending: list[threading.Thread] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if _UNAUTHORISED.search(line):
                result.unauthorised = True
            if _GRACEFUL in line:
                result.graceful = True
            hint = _site_hint(line)
            if hint:
                result.hint = hint
            if (result.unauthorised or result.graceful) and not ending:
                # let go by the coordinator: this SuperNode will not recover on its own
                ending.append(threading.Thread(target=stop, args=(proc, GRACE), daemon=True))
                ending[0].start()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        result.rc = proc.wait()
        reader.join(DRAIN)  # its last lines (the reason it stopped), unless a child holds on
        return result
    finally:
        stop(proc)
