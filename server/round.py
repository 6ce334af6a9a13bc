"""One federation round as an object: :class:`Coordinator` runs it, :class:`RoundReport` says
what happened.

A round, in order (one exchange per site once it has confirmed the teacher):

1. sample ``fraction-train`` of the connected sites (at least ``min-train-nodes``);
2. first contact only: ask the sites not yet known to hold the teacher
   (``query.teacher_status``); a train reply with ``teacher-cached`` confirms it, a
   ``missing-teacher`` error withdraws it;
3. train: the global student, the round, the teacher's hash, ``evaluate`` (also score the
   incoming student on the site's validation split) and the teacher only where it is missing;
4. check every reply (protocol, names, shapes, finite values) and aggregate the accepted ones
   (:class:`server.aggregation.Aggregator`); with fewer than ``min-train-nodes`` accepted the
   round **failed** and the global student is unchanged.

The report records per site what was sent and received (bytes of every message, the status
query's included), examples, metrics, the incoming student's evaluation, and failures with
their category; results, report, plots and resume read it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from moma_core.models import build_model
from moma_protocol import wire as P
from moma_protocol.settings import RunConfig
from server.aggregation import Aggregator, check_update
from server.live import LiveStatus, SitesMissing
from server.teacher_package import TeacherPackage

log = logging.getLogger("moma.server")

OK, FAILED, REJECTED, NO_REPLY = "ok", "failed", "rejected", "no reply"


@dataclass
class SiteReport:
    """One site's part in a round."""

    node_id: int
    site_name: str
    status: str = NO_REPLY  # ok | failed | rejected | no reply
    reason: str | None = None  # an error category or a fixed protocol text
    bytes_down: int = 0
    bytes_up: int = 0
    teacher_sent: bool = False
    teacher_bytes: int = 0  # of bytes_down: the teacher package (first contact only)
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    incoming_eval: dict[str, float] | None = None  # the student it received, on its val split


@dataclass
class RoundReport:
    """What one round did (see module docstring)."""

    round: int
    sites: list[SiteReport]
    min_train_nodes: int
    train: dict[str, float] | None = None  # example-weighted means of the train metrics
    incoming_eval: dict[str, float] | None = None  # weighted evaluation of the start model
    start_digest: str = ""
    end_digest: str = ""
    wall_s: float = 0.0

    @property
    def ok_sites(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == OK]

    @property
    def failed(self) -> bool:
        """Fewer than ``min-train-nodes`` sites trained: the global student is unchanged."""
        return len(self.ok_sites) < self.min_train_nodes

    @property
    def bytes_down(self) -> int:
        return sum(s.bytes_down for s in self.sites)

    @property
    def bytes_up(self) -> int:
        return sum(s.bytes_up for s in self.sites)

    def reasons(self) -> list[str]:
        """One line per site that did not train, in site-name order (replies arrive in any
        order; the report and the error message should not)."""
        failed = sorted((s for s in self.sites if s.status != OK),
                        key=lambda s: (s.site_name, s.node_id))
        return [f"{s.site_name}: {s.status}{f' ({s.reason})' if s.reason else ''}"
                for s in failed]

    def to_json(self) -> dict:
        sites = {str(s.node_id): {k: v for k, v in asdict(s).items() if k != "node_id"}
                 for s in self.sites}
        return {"round": self.round, "status": "failed" if self.failed else "ok",
                "train": self.train, "incoming_eval": self.incoming_eval,
                "sites": sites,
                "failed_sites": [str(s.node_id) for s in self.sites if s.status != OK],
                "examples": {str(s.node_id): s.num_examples for s in self.sites},
                "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                "start_digest": self.start_digest, "end_digest": self.end_digest,
                "wall_s": self.wall_s}


def record_nbytes(content: RecordDict) -> int:
    """Bytes of the arrays in a message plus the size of its config/metric values."""
    total = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += sum(len(a.data) for a in rec.values())
        else:
            total += sum(len(str(k)) + len(str(v)) for k, v in rec.items())
    return total


#: Seconds between the progress lines of a wait (sites to connect, replies to arrive).
PROGRESS_EVERY = 30.0


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


def weighted_means(rows: Iterable[dict[str, float]], weight_key: str = P.NUM_EXAMPLES
                   ) -> dict[str, float] | None:
    """Per-key means weighted by ``weight_key`` (which is summed); None without weight."""
    rows = [r for r in rows if float(r.get(weight_key, 0)) > 0]
    if not rows:
        return None
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for r in rows for k in r if k != weight_key):
        pairs = [(float(r[k]), float(r[weight_key])) for r in rows if k in r]
        out[k] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    out[weight_key] = sum(float(r[weight_key]) for r in rows)
    return out


class Coordinator:
    """Runs rounds of one federation run (see module docstring)."""

    def __init__(self, grid: Grid, run: RunConfig, teacher: TeacherPackage | None,
                 names: dict[int, str] | None = None, live: LiveStatus | None = None) -> None:
        self.grid, self.run, self.teacher = grid, run, teacher
        # live.json (server.live); its ``registered`` names are the run's site registry
        self.live = live if live is not None else LiveStatus(None, registered=names)
        self.rng = random.Random(run.federation.seed)
        self.names = dict(names or {})
        self.names_registered = names is not None  # True: names come from registered keys
        self.confirmed: set[int] = set()  # sites known to hold the teacher
        self.contacted: set[int] = set()  # sites that answered the first-contact query
        self.aggregate = Aggregator(run.federation, run.privacy)
        self.connected = 0  # sites connected when the last round was sampled
        self.local_keys: set[str] = set()  # what sites keep to themselves (FedBN)
        fed = run.federation
        if fed.fedbn:
            arch = run.student_architecture()
            self.local_keys = P.local_keys(True, build_model(arch))

    @property
    def teacher_sha(self) -> str:
        return self.teacher.sha256 if self.teacher is not None else ""

    def name(self, node: int) -> str:
        return self.names.get(node, str(node))

    # -- sampling and teacher status -------------------------------------------------------
    def sample(self, rnd: int = 0) -> list[int]:
        fed = self.run.federation
        nodes = wait_for_nodes(self.grid, fed.min_available_nodes, fed.round_timeout,
                               self.live, rnd)
        if len(nodes) < fed.min_train_nodes:
            raise SitesMissing(
                f"only {len(nodes)} site(s) connected after {fed.round_timeout:.0f} s; the run "
                f"needs at least {fed.min_train_nodes} (min-train-nodes); "
                f"{self._missing_sites(nodes)}. The completed rounds are saved: start again "
                "with --resume")
        self.connected = len(nodes)
        size = min(len(nodes), max(math.ceil(len(nodes) * fed.fraction_train),
                                   fed.min_train_nodes))
        return sorted(self.rng.sample(sorted(nodes), size))

    def _missing_sites(self, nodes: list[int]) -> str:
        """Which sites are missing, for the error line."""
        missing = self.live.not_connected()
        if missing:
            return "not connected: " + ", ".join(missing)
        if self.live.registered:
            return ("every registered site is connected (" + ", ".join(
                sorted(self.live.registered.values())) + "): the federation has fewer active "
                "sites than the run needs (a revoked site? add one with moma-deploy add-site)")
        connected = ", ".join(self.name(n) for n in sorted(nodes)) or "none"
        return f"connected: {connected}"

    def _ask_teacher_status(self, nodes: list[int], sites: dict[int, SiteReport]) -> None:
        """First contact: which of ``nodes`` hold the teacher (bytes counted in ``sites``)."""
        content = RecordDict({P.CONFIG: ConfigRecord({P.TEACHER_SHA: self.teacher_sha})})
        msgs = [Message(content, dst_node_id=n, message_type=P.TEACHER_STATUS) for n in nodes]
        for n in nodes:
            sites[n].bytes_down += record_nbytes(content)
        timeout = min(120.0, self.run.federation.round_timeout)
        for node, reply in exchange(self.grid, msgs, timeout, name=self.name,
                                    label="teacher status"):
            if reply.has_error():
                log.warning("site %s: teacher status query failed: %s", self.name(node),
                            P.error_reason(reply))
                continue
            sites[node].bytes_up += record_nbytes(reply.content)
            problems = P.check_site_reply(reply.content, P.TEACHER_STATUS)
            if problems:
                log.warning("site %s: teacher status reply rejected: protocol: %s",
                            self.name(node), problems[0])
                continue
            self.contacted.add(node)
            if bool(reply.content[P.METRICS][P.HAS_TEACHER]):
                self.confirmed.add(node)
            if P.CONFIG in reply.content and not self.names_registered:
                self.names[node] = str(reply.content[P.CONFIG][P.SITE_NAME])
                sites[node].site_name = self.names[node]

    # -- one round -------------------------------------------------------------------------
    def train_messages(self, rnd: int, nodes: list[int], arrays: ArrayRecord,
                       sites: dict[int, SiteReport]) -> list[Message]:
        fed = self.run.federation
        n_eval = math.ceil(len(nodes) * fed.fraction_evaluate)
        if self.run.privacy.secagg != "off":
            n_eval = 0  # a secure round's replies carry only the masked update and metrics
        scorers = set(self.rng.sample(nodes, n_eval)) if n_eval < len(nodes) else set(nodes)
        dp = self.aggregate.client_dp
        clip = dp.round_norm() if dp is not None else None
        messages = []
        for node in nodes:
            config = ConfigRecord({P.SERVER_ROUND: rnd, P.TEACHER_SHA: self.teacher_sha,
                                   P.EVALUATE_FLAG: node in scorers})
            if clip is not None:
                config[P.CLIPPING_NORM] = clip
            records = {P.ARRAYS: arrays, P.CONFIG: config}
            if self.teacher is not None and node not in self.confirmed:
                package = self.teacher.records()
                records.update(package)
                sites[node].teacher_bytes = record_nbytes(RecordDict(package))
            content = RecordDict(records)
            sites[node].bytes_down += record_nbytes(content)
            sites[node].teacher_sent = P.TEACHER in records
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def run_round(self, rnd: int, state: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], RoundReport]:
        """Train one round from ``state``; returns the new global state and the report."""
        nodes = self.sample(rnd)
        sites = {n: SiteReport(n, self.name(n)) for n in nodes}
        self.live.round_sampled(rnd, {n: s.site_name for n, s in sites.items()})
        # first contact (and, with a teacher, until a site holds it): teacher status + name;
        # a run without a teacher (CE) asks once, for the site's name
        known = self.confirmed if self.teacher is not None else self.contacted
        ask = [n for n in nodes if n not in known]
        if ask:
            self._ask_teacher_status(ask, sites)
        dtype = self.run.federation.transfer_dtype
        msgs = self.train_messages(rnd, nodes, P.encode_state(P.pack_global(state, dtype)), sites)
        log.info("round %d: training on %d sites (teacher sent to %d)", rnd, len(nodes),
                 sum(s.teacher_sent for s in sites.values()))
        if ask:  # the first-contact query may have told a site's name
            self.live.round_sampled(rnd, {n: s.site_name for n, s in sites.items()})
        timeout = self.run.federation.round_timeout
        self.live.update(deadline=time.time() + timeout)
        if self.run.privacy.secagg != "off":
            new_state, report = self._secure_round(rnd, state, msgs, sites)
            self._live_sites(report)
            return new_state, report

        def arrived(node: int, reply: Message) -> None:
            self.live.site(node, FAILED if reply.has_error() else OK)

        replies = exchange(self.grid, msgs, timeout, on_reply=arrived, name=self.name,
                           label=f"round {rnd}")
        updates, weights = self._check_replies(replies, state, sites)
        report = RoundReport(rnd, [sites[n] for n in nodes], self.run.federation.min_train_nodes)
        report.train = weighted_means({**s.metrics, P.NUM_EXAMPLES: s.num_examples}
                                      for s in report.ok_sites)
        report.incoming_eval = weighted_means(s.incoming_eval for s in report.sites
                                              if s.incoming_eval)
        self._live_sites(report)
        for line in report.reasons():
            log.warning("round %d: %s", rnd, line)
        if report.failed:
            log.warning("round %d failed: %d of %d sites trained, min-train-nodes is %d; the "
                        "global student is unchanged", rnd, len(report.ok_sites), len(nodes),
                        self.run.federation.min_train_nodes)
            return state, report
        return self.aggregate(rnd, updates, weights, state, self.connected), report

    def _live_sites(self, report: RoundReport) -> None:
        """live.json: every sampled site's final status of the round."""
        status = {s.node_id: s.status for s in report.sites}
        for x in self.live.data["sites"]:
            x["status"] = status.get(x["node_id"], x["status"])
        self.live.update(waiting_for=[], deadline=None)

    def _secure_round(self, rnd: int, state: dict[str, torch.Tensor], msgs: list[Message],
                      sites: dict[int, SiteReport]
                      ) -> tuple[dict[str, torch.Tensor], RoundReport]:
        """The round's train exchange under SecAgg+ (:mod:`server.secagg`): the new global is
        the old one plus the weighted mean change (with client-level DP, plus its noise)."""
        from server.secagg import SecureExchange

        fed = self.run.federation
        keys = [k for k in state if k not in self.local_keys]
        contents = {m.metadata.dst_node_id: m.content for m in msgs}
        for node in contents:  # the protocol's messages are counted from here on
            sites[node].bytes_down = sites[node].bytes_down - record_nbytes(contents[node])
        result = SecureExchange(self.run.privacy, fed.round_timeout).run(
            self.grid, rnd, contents, {k: tuple(state[k].shape) for k in keys}, keys)
        for node, site in sites.items():
            site.bytes_down += result.bytes_down.get(node, 0)
            site.bytes_up += result.bytes_up.get(node, 0)
            if node in result.metrics:
                metrics = dict(result.metrics[node])
                site.num_examples = int(metrics.pop(P.NUM_EXAMPLES, 0))
                site.metrics, site.status = metrics, OK
                if metrics.get(P.TEACHER_CACHED):
                    self.confirmed.add(node)
            else:
                site.status = FAILED if result.failures.get(node) != "no reply" else NO_REPLY
                site.reason = result.failures.get(node)
                if site.reason == "missing-teacher":
                    self.confirmed.discard(node)
        report = RoundReport(rnd, [sites[n] for n in sorted(sites)], fed.min_train_nodes)
        report.train = weighted_means({**s.metrics, P.NUM_EXAMPLES: s.num_examples}
                                      for s in report.ok_sites)
        for line in report.reasons():
            log.warning("round %d: %s", rnd, line)
        if report.failed or result.mean is None:
            for s in report.sites:  # no aggregate: no site's update counted
                if s.status == OK:
                    s.status, s.reason = FAILED, "secure aggregation: no aggregate"
            log.warning("round %d failed under secure aggregation: %d of %d sites in the "
                        "sum, min-train-nodes is %d; the global student is unchanged", rnd,
                        len(result.metrics), len(sites), fed.min_train_nodes)
            return state, report
        new = self.aggregate.secure_mean(rnd, state, result.mean, len(report.ok_sites),
                                         self.connected)
        return new, report

    def _check_replies(self, replies: list[tuple[int, Message]],
                       reference: dict[str, torch.Tensor], sites: dict[int, SiteReport]
                       ) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
        updates, weights = [], []
        for node, reply in replies:
            site = sites[node]
            if reply.has_error():
                site.status, site.reason = FAILED, P.error_reason(reply)
                if site.reason == "missing-teacher":
                    self.confirmed.discard(node)
                continue
            site.bytes_up += record_nbytes(reply.content)
            problems = P.check_site_reply(reply.content, P.TRAIN, set(reference))
            if problems:
                site.status, site.reason = REJECTED, f"protocol: {problems[0]}"
                continue
            if P.EVAL_METRICS in reply.content:
                site.incoming_eval = dict(reply.content[P.EVAL_METRICS])
            try:
                sent = P.decode_state(P.state_blob(reply.content[P.ARRAYS]))
            except ValueError as exc:
                site.status, site.reason = REJECTED, f"protocol: {exc}"
                continue
            update = P.unpack_update(sent, reference)
            metrics = dict(reply.content[P.METRICS])
            site.num_examples = int(metrics.pop(P.NUM_EXAMPLES, 0))
            site.metrics = metrics
            if metrics.get(P.TEACHER_CACHED):
                self.confirmed.add(node)
            problem = check_update(update, reference, self.local_keys) or \
                self.aggregate.check(update, reference)
            if problem or site.num_examples <= 0:
                site.status, site.reason = REJECTED, problem or "no training examples"
                continue
            site.status = OK
            updates.append(update)
            weights.append(float(site.num_examples))
        return updates, weights

    # -- final evaluation ------------------------------------------------------------------
    def evaluate(self, rnd: int, state: dict[str, torch.Tensor], nodes: list[int]
                 ) -> tuple[dict[str, float] | None, dict[str, dict], int, int]:
        """Score ``state`` on the validation split of ``nodes`` (after the last round).

        Returns the weighted metrics, per-site metrics (or failure), bytes down and up.
        """
        arrays = P.pack_global(state, self.run.federation.transfer_dtype)
        content = RecordDict({P.ARRAYS: P.encode_state(arrays),
                              P.CONFIG: ConfigRecord({P.SERVER_ROUND: rnd})})
        msgs = [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE)
                for n in nodes]
        replies = exchange(self.grid, msgs, self.run.federation.round_timeout, name=self.name,
                           label="final evaluation")
        metrics, per_site, up = self.check_evaluations(replies)
        return metrics, per_site, record_nbytes(content) * len(msgs), up

    def check_evaluations(self, replies: list[tuple[int, Message]]
                          ) -> tuple[dict[str, float] | None, dict[str, dict], int]:
        """Weighted metrics, per-site metrics (or failure) and bytes up of evaluate replies."""
        up, per_site = 0, {}
        for node, reply in replies:
            name = self.name(node)
            if reply.has_error():
                per_site[str(node)] = {"status": FAILED, "reason": P.error_reason(reply),
                                       "site-name": name}
                continue
            up += record_nbytes(reply.content)
            problems = P.check_site_reply(reply.content, P.EVALUATE)
            if problems:
                per_site[str(node)] = {"status": REJECTED, "site-name": name,
                                       "reason": f"protocol: {problems[0]}"}
                continue
            per_site[str(node)] = {**dict(reply.content[P.METRICS]), "site-name": name}
        rows = [{k: v for k, v in m.items() if k != "site-name"}
                for m in per_site.values() if "status" not in m]
        return weighted_means(rows), per_site, up
