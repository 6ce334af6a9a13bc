"""The coordinator's messaging: building messages, sending them and collecting the replies.

Both the plain round (:mod:`server.round`) and the secure one (:mod:`server.secagg`) talk to the
sites only through this module; it knows nothing of rounds, reports or aggregation.

- :func:`to_nodes` builds one message of the same content per node;
- :func:`wait_for_nodes` waits for enough sites to connect (progress lines and live.json);
- :func:`exchange` sends messages and collects their replies, matched to the node each message
  went to (a node that does not answer within the timeout is absent from the result);
- :func:`record_nbytes` is the byte count every report uses (of what was sent and received).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from server.live import LiveStatus

log = logging.getLogger("moma.server")

#: Seconds between the progress lines of a wait (sites to connect, replies to arrive).
PROGRESS_EVERY = 30.0


def record_nbytes(content: RecordDict) -> int:
    """Bytes of the arrays in a message plus the size of its config/metric values."""
    total = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += sum(len(a.data) for a in rec.values())
        else:
            total += sum(len(str(k)) + len(str(v)) for k, v in rec.items())
    return total


def to_nodes(content: RecordDict, nodes: Iterable[int], message_type: str) -> list[Message]:
    """One message of ``content`` and ``message_type`` for each of ``nodes``."""
    return [Message(content, dst_node_id=n, message_type=message_type) for n in nodes]


def wait_for_nodes(grid: Grid, minimum: int, timeout: float,
                   live: LiveStatus | None = None, rnd: int = 0) -> list[int]:
    """Connected node ids, waiting up to ``timeout`` seconds for ``minimum`` of them.

    While waiting, a line at most every :data:`PROGRESS_EVERY` seconds names the registered
    sites (``live.registered``) that are not connected and the time left; ``live`` (live.json)
    follows every change of the connected set.
    """
    live = live if live is not None else LiveStatus(None)
    deadline = time.time() + timeout
    nodes = list(grid.get_node_ids())
    seen: set[int] | None = None
    last_report = -math.inf  # the first line at once, then every PROGRESS_EVERY s
    while len(nodes) < minimum and time.time() < deadline:
        if seen != set(nodes):
            seen = set(nodes)
            live.waiting(rnd, nodes, deadline)
        if time.time() - last_report >= PROGRESS_EVERY:
            missing = live.not_connected()
            line = (f"waiting for sites: {len(nodes)} of {minimum} connected"
                    + (f", not connected: {', '.join(missing)}" if missing else "")
                    + f"; {max(deadline - time.time(), 0):.0f} s left of the round timeout")
            log.info("%s", line)
            live.progress(line)
            last_report = time.time()
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    live.waiting(rnd, nodes, deadline)
    return nodes


def exchange(grid: Grid, messages: list[Message], timeout: float, poll: float = 0.2,
             on_reply: Callable[[int, Message], None] | None = None,
             name: Callable[[int], str] = str, label: str = "") -> list[tuple[int, Message]]:
    """Send and collect replies as (destination node, reply), polling every ``poll`` s.

    An error reply made by the SuperLink for a vanished node carries the SuperLink as its
    source, so replies are matched to nodes by the id of the message they answer. A node that
    does not answer within ``timeout`` is simply absent from the result. ``on_reply(node,
    reply)`` is called as each reply arrives; while replies are missing a line at most every
    :data:`PROGRESS_EVERY` seconds (prefixed ``label``) names the sites (``name(node)``) not
    yet replied and the time left.
    """
    if not messages:
        return []
    ids = list(grid.push_messages(messages))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}
    pending, out, deadline = set(ids), [], time.time() + timeout
    last_report = time.time()
    while pending and time.time() < deadline:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                pending.discard(mid)
                out.append((node_of[mid], reply))
                if on_reply is not None:
                    on_reply(node_of[mid], reply)
        if pending and time.time() - last_report >= PROGRESS_EVERY:
            waiting = sorted(name(node_of[m]) for m in pending)
            log.info("%swaiting for %s (%d of %d replied); %.0f s left of the round timeout",
                     f"{label}: " if label else "", ", ".join(waiting), len(out), len(ids),
                     max(deadline - time.time(), 0))
            last_report = time.time()
        if pending:
            time.sleep(poll)
    return out
