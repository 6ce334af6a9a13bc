"""``runs/<name>/live.json``: the run's state as it changes, for dashboards and ``moma-server``.

The ServerApp rewrites the file atomically at every state change (waiting for sites, a round's
sites sampled, each reply, evaluation, the end), so a reader never sees half a file. Its keys
(docs/results.md): ``run_name``, ``updated``, ``state`` (``waiting``, ``training``,
``evaluating``, ``finished``, ``failed``), ``round``, ``num_rounds``, ``round_started``,
``round_timeout``, ``deadline`` (when the current wait gives up, or null), ``connected``,
``min_nodes``, ``sites`` (the round's sampled sites and their status), ``waiting_for`` (site
names), ``message`` (the last progress line) and ``end`` (null until the run ended, then
``status``, ``reason``, ``exit_code``).

A run that ends for a reason a user can act on raises :class:`RunEnded` (its ``exit_code`` is
the command's): ``moma-server`` prints its one line and exits with that code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from moma_core.atomic import atomic_write

#: Exit codes of ``moma-server`` (docs/deploy.md, "Exit codes").
EXIT_COMPLETED = 0
EXIT_FAILED = 1  # any other failure
EXIT_BAD_INPUT = 2  # refused before or at the start (run_cli's code)
EXIT_SITES_MISSING = 3  # fewer sites connected than the run needs within round-timeout
EXIT_NO_ROUND_TRAINED = 4  # every round failed: no student was trained

STATES = ("waiting", "training", "evaluating", "finished", "failed")
SITE_STATES = ("training", "ok", "failed", "rejected", "no reply")


class RunEnded(RuntimeError):
    """The run ended early for a reason a user can act on; the message is one line."""

    exit_code = EXIT_FAILED


class SitesMissing(RunEnded):
    """Fewer sites connected within the round timeout than the run needs."""

    exit_code = EXIT_SITES_MISSING


class LiveStatus:
    """The writer of live.json; ``path`` None keeps the state in memory only (tests, tools)."""

    def __init__(self, path: Path | None, run_name: str = "", num_rounds: int = 0,
                 round_timeout: float = 0.0, min_nodes: int = 0,
                 registered: dict[int, str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.registered = dict(registered or {})  # node id → registered site name
        self._connected: set[int] = set()
        self.data: dict = {"run_name": run_name, "updated": time.time(), "state": "waiting",
                           "round": 0, "num_rounds": num_rounds, "round_started": None,
                           "round_timeout": float(round_timeout), "deadline": None,
                           "connected": 0, "min_nodes": min_nodes, "sites": [],
                           "waiting_for": [], "message": "", "end": None}

    def write(self) -> None:
        self.data["updated"] = time.time()
        if self.path is None:
            return
        text = json.dumps(self.data, indent=2)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def update(self, **fields: object) -> None:
        """Set top-level keys and rewrite the file."""
        self.data.update(fields)
        self.write()

    def not_connected(self) -> list[str]:
        """Registered site names whose node is not connected now."""
        return sorted(name for node, name in self.registered.items()
                      if node not in self._connected)

    def waiting(self, rnd: int, connected: list[int], deadline: float) -> None:
        """Waiting for sites to connect before round ``rnd`` is sampled."""
        self._connected = set(connected)
        fresh = self.data["round"] != rnd
        self.update(state="waiting", round=rnd, connected=len(connected), deadline=deadline,
                    sites=[] if fresh else self.data["sites"],
                    round_started=time.time() if fresh else self.data["round_started"],
                    waiting_for=self.not_connected())

    def round_sampled(self, rnd: int, sites: dict[int, str], deadline: float | None = None
                      ) -> None:
        """The round's sites were sampled and are now training."""
        self.data["sites"] = [{"node_id": int(n), "site_name": name, "status": "training"}
                              for n, name in sorted(sites.items())]
        self.update(state="training", round=rnd, deadline=deadline,
                    waiting_for=self._pending())

    def site(self, node: int, status: str) -> None:
        """One sampled site's status (``SITE_STATES``)."""
        for s in self.data["sites"]:
            if s["node_id"] == int(node):
                s["status"] = status
        self.update(waiting_for=self._pending())

    def _pending(self) -> list[str]:
        return sorted(s["site_name"] for s in self.data["sites"] if s["status"] == "training")

    def progress(self, message: str, **fields: object) -> None:
        """The last progress line (and any other keys, e.g. ``state``)."""
        self.update(message=message, **fields)

    def end(self, status: str, reason: str, exit_code: int) -> None:
        """The run ended: ``status`` ``completed`` or ``failed``."""
        self.update(state="finished" if status == "completed" else "failed", deadline=None,
                    waiting_for=[] if status == "completed" else self.data["waiting_for"],
                    end={"status": status, "reason": reason, "exit_code": int(exit_code)})


def read_end(path: Path, since: float = 0.0) -> dict | None:
    """live.json's ``end`` (None when the file is missing, unreadable, last written before
    ``since`` — a previous run's — or the run has not ended)."""
    try:
        data = json.loads(Path(path).read_text())
        end = data.get("end")
        if float(data.get("updated") or 0.0) < since:
            return None
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if not isinstance(end, dict) or "exit_code" not in end:
        return None
    return end
