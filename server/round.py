"""One federation round as an object: :class:`Coordinator`, the run's Flower ``Strategy``,
runs it, :class:`RoundReport` says what happened.

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

Messages go out and replies come back through :mod:`server.transport` (the secure round's
through :mod:`server.secagg`, which uses the same transport). The report records per site what
was sent and received (bytes of every message, the status query's included), examples, metrics,
the incoming student's evaluation, and failures with their category; results, report, plots and
resume read it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from moma_core.models import build_model
from moma_protocol import wire
from moma_protocol.settings import RunConfig
from server.aggregation import Aggregator, check_update
from server.live import LiveStatus, SitesMissing
from server.secagg import SecureExchange
from server.teacher_package import TeacherPackage
from server.transport import exchange, record_nbytes, to_nodes, wait_for_nodes

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

    def finish(self, secure: bool = False, aggregated: bool = True) -> bool:
        """Complete the report once the round's replies are in, for the plain and the secure
        round alike: the example-weighted means of the train metrics and of the incoming
        student's evaluation, one warning per site that did not train and, for a failed round,
        the warning that says so. ``aggregated``: the secure sum was unmasked (without it no
        site's update counted: every trained site is marked failed). Returns whether the
        global student is updated this round."""
        self.train = weighted_means({**s.metrics, wire.NUM_EXAMPLES: s.num_examples}
                                    for s in self.ok_sites)
        self.incoming_eval = weighted_means(s.incoming_eval for s in self.sites
                                            if s.incoming_eval)
        for line in self.reasons():
            log.warning("round %d: %s", self.round, line)
        if not self.failed and aggregated:
            return True
        trained = len(self.ok_sites)
        if secure:
            for s in self.sites:  # no aggregate: no site's update counted
                if s.status == OK:
                    s.status, s.reason = FAILED, "secure aggregation: no aggregate"
            log.warning("round %d failed under secure aggregation: %d of %d sites in the "
                        "sum, min-train-nodes is %d; the global student is unchanged",
                        self.round, trained, len(self.sites), self.min_train_nodes)
        else:
            log.warning("round %d failed: %d of %d sites trained, min-train-nodes is %d; the "
                        "global student is unchanged", self.round, trained, len(self.sites),
                        self.min_train_nodes)
        return False

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


def weighted_means(rows: Iterable[dict[str, float]], weight_key: str = wire.NUM_EXAMPLES
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


@dataclass
class _Exchange:
    """Messages sent by ``configure_train`` / ``configure_evaluate``, kept until their
    ``aggregate_*`` call: the replies are matched to sites by the id of the message they
    answer. Flower's grids (the SuperLink's and the simulation's) write that id into the
    message they push; the deployment and simulation tests fail if one stops doing so (every
    site would be "no reply")."""

    round: int
    messages: list[Message]
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # the round's global student
    sites: dict[int, SiteReport] = field(default_factory=dict)

    def by_node(self, replies: Iterable[Message]) -> list[tuple[int, Message]]:
        """(node, reply) for each reply to one of :attr:`messages`; others are dropped, and
        so is a reply with content from a node other than the one its message went to (the
        SuperLink refuses those already; an error reply may come from the SuperLink itself,
        for a node that vanished)."""
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in self.messages}
        out = []
        for r in replies:
            node = node_of.get(r.metadata.reply_to_message_id)
            if node is None or (not r.has_error() and r.metadata.src_node_id != node):
                continue
            out.append((node, r))
        return out


class Coordinator(Strategy):
    """The run's Flower strategy (see module docstring): a :class:`flwr.serverapp.strategy
    .Strategy` whose ``configure_train`` samples, settles the teacher and builds each site's
    message, whose ``aggregate_train`` checks the replies and hands the accepted updates to
    Flower's own strategy of the run's ``aggregation`` (:class:`server.aggregation.Aggregator`,
    with Flower's DP wrapper under client-level DP), and whose ``configure_evaluate`` /
    ``aggregate_evaluate`` score the final student at the sites that trained the last round.

    Flower's ``Strategy.start`` runs it as it is; the ServerApp drives the same methods
    through :meth:`run_round` instead, to start at a resumed run's next round, wait for sites
    and replies within ``round-timeout`` (Flower's sampling waits forever) with live.json and
    progress lines, and run SecAgg+'s several exchanges (:meth:`run_round`'s secure branch).
    """

    def __init__(self, grid: Grid | None, run: RunConfig, teacher: TeacherPackage | None,
                 names: dict[int, str] | None = None, live: LiveStatus | None = None) -> None:
        self.grid, self.run, self.teacher = grid, run, teacher
        # live.json (server.live); its ``registered`` names are the run's site registry
        self.live = live if live is not None else LiveStatus(None, registered=names)
        self.rng = random.Random(run.federation.seed)
        self.names = dict(names or {})
        self.names_registered = names is not None  # True: names come from registered keys
        self.confirmed: set[int] = set()  # sites known to hold the teacher
        self.contacted: set[int] = set()  # sites that answered the first-contact query
        self.aggregator = Aggregator(run.federation, run.privacy)
        self.connected = 0  # sites connected when the last round was sampled
        self.local_keys: set[str] = set()  # what sites keep to themselves (FedBN)
        self.report: RoundReport | None = None  # the last round's, once aggregated
        self.evaluation: tuple[dict[str, dict], int] = ({}, 0)  # per site, bytes up
        self._train: _Exchange | None = None
        self._evaluate: _Exchange | None = None
        fed = run.federation
        if fed.fedbn:
            arch = run.student_architecture()
            self.local_keys = wire.local_keys(True, build_model(arch))

    @property
    def teacher_sha(self) -> str:
        return self.teacher.sha256 if self.teacher is not None else ""

    def name(self, node: int) -> str:
        return self.names.get(node, str(node))

    # -- what a resumed run restores -------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run restores, saved after every round: ``rng`` (the sampling
        generator, as JSON), ``aggregator`` (the method's tensors, stateful methods only:
        :meth:`server.aggregation.Aggregator.state_dict`) and ``client_dp`` (the client-level
        DP account, with client-level DP only). :class:`server.results.RunResults` writes the
        aggregator's tensors to their own file (results.json's ``server_state``)."""
        state: dict = {"rng": rng_json(self.rng.getstate())}
        aggregator = self.aggregator.state_dict()
        if aggregator:
            state["aggregator"] = aggregator
        if self.aggregator.client_dp is not None:
            state["client_dp"] = self.aggregator.client_dp.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (a resumed run); ValueError when it cannot be
        continued (another method's state; a client-level DP run without its account)."""
        if state.get("rng"):
            rng = state["rng"]
            self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        if "aggregator" in state:  # FedAdam's moments continue where they were
            self.aggregator.load_state_dict(state["aggregator"])
        self.aggregator.restore_client_dp(state)

    def client_dp_spent(self, rnd: int) -> dict | None:
        """The client-level DP account after round ``rnd`` (logged), or None without it."""
        client_dp = self.aggregator.client_dp
        if client_dp is None:
            return None
        spent = client_dp.spent()
        log.info("round %d: client-level DP epsilon %.3f (delta %g) after %d releases",
                 rnd, spent["epsilon"], client_dp.delta, len(client_dp.releases))
        return spent

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
        content = RecordDict({wire.CONFIG: ConfigRecord({wire.TEACHER_SHA: self.teacher_sha})})
        msgs = to_nodes(content, nodes, wire.TEACHER_STATUS)
        for n in nodes:
            sites[n].bytes_down += record_nbytes(content)
        timeout = min(120.0, self.run.federation.round_timeout)
        for node, reply in exchange(self.grid, msgs, timeout, name=self.name,
                                    label="teacher status"):
            if reply.has_error():
                log.warning("site %s: teacher status query failed: %s", self.name(node),
                            wire.error_reason(reply))
                continue
            sites[node].bytes_up += record_nbytes(reply.content)
            problems = wire.check_site_reply(reply.content, wire.TEACHER_STATUS)
            if problems:
                log.warning("site %s: teacher status reply rejected: protocol: %s",
                            self.name(node), problems[0])
                continue
            self.contacted.add(node)
            if bool(reply.content[wire.METRICS][wire.HAS_TEACHER]):
                self.confirmed.add(node)
            if wire.CONFIG in reply.content and not self.names_registered:
                self.names[node] = str(reply.content[wire.CONFIG][wire.SITE_NAME])
                sites[node].site_name = self.names[node]

    # -- one round -------------------------------------------------------------------------
    def train_messages(self, rnd: int, nodes: list[int], arrays: ArrayRecord,
                       sites: dict[int, SiteReport],
                       config: ConfigRecord | None = None) -> list[Message]:
        """One train message per node: ``config``'s entries, then the round's own (round,
        teacher hash, whether to score the incoming student, the clipping norm under
        client-level DP), the global student and, where a site lacks it, the teacher."""
        fed = self.run.federation
        n_eval = math.ceil(len(nodes) * fed.fraction_evaluate)
        if self.run.privacy.secagg != "off":
            n_eval = 0  # a secure round's replies carry only the masked update and metrics
        scorers = set(self.rng.sample(nodes, n_eval)) if n_eval < len(nodes) else set(nodes)
        dp = self.aggregator.client_dp
        clip = dp.round_norm() if dp is not None else None
        messages = []
        for node in nodes:
            own = ConfigRecord(dict(config or {}))
            own.update({wire.SERVER_ROUND: rnd, wire.TEACHER_SHA: self.teacher_sha,
                        wire.EVALUATE_FLAG: node in scorers})
            if clip is not None:
                own[wire.CLIPPING_NORM] = clip
            records = {wire.ARRAYS: arrays, wire.CONFIG: own}
            if self.teacher is not None and node not in self.confirmed:
                package = self.teacher.records()
                records.update(package)
                sites[node].teacher_bytes = record_nbytes(RecordDict(package))
            content = RecordDict(records)
            sites[node].bytes_down += record_nbytes(content)
            sites[node].teacher_sent = wire.TEACHER in records
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    # -- Flower's Strategy -----------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        """Round ``server_round``'s train messages from the global student ``arrays``: sample
        the connected sites (waiting up to ``round-timeout`` for ``min-available-nodes``),
        ask the sites met for the first time whether they hold the teacher, one message per
        sampled site (:meth:`train_messages`). A run under SecAgg+ is refused (ValueError): its
        round is several exchanges, which :meth:`run_round` runs."""
        if self.run.privacy.secagg != "off":
            raise ValueError("a secure-aggregation round is several exchanges: run it with "
                             "Coordinator.run_round, not Strategy.start")
        self.grid = grid
        return self._start_round(server_round, arrays.to_torch_state_dict(), config).messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply to this round's train messages and aggregate the accepted
        updates (:mod:`server.aggregation`): the new global student and the example-weighted
        means of the sites' train metrics. With fewer than ``min-train-nodes`` accepted the
        round failed: no arrays (the global student stays). The round's
        :class:`RoundReport` is :attr:`report`."""
        pending = self._train
        if pending is None or pending.round != server_round:
            raise ValueError(f"round {server_round} was not configured by this strategy")
        self._train = None
        updates, weights = self._check_replies(pending.by_node(replies), pending.state,
                                               pending.sites)
        report = RoundReport(server_round, [pending.sites[n] for n in sorted(pending.sites)],
                             self.run.federation.min_train_nodes)
        self.report = report
        self._live_sites(report)
        aggregated = report.finish()
        metrics = MetricRecord(report.train) if report.train else None
        if not aggregated:
            return None, metrics
        new = self.aggregator(server_round, updates, weights, pending.state, self.connected)
        return ArrayRecord(new), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        """After the last round only (``num-rounds``), with ``fraction-evaluate`` > 0: the
        final student to the sites that trained in it (as the ServerApp's final evaluation),
        to score on their validation split. Every other round: no message (a round's incoming
        student is scored within its train exchange)."""
        report = self.report
        if server_round != self.run.federation.num_rounds or report is None \
                or report.round != server_round or self.run.federation.fraction_evaluate <= 0:
            return []
        self.grid = grid
        nodes = [s.node_id for s in report.ok_sites]  # as the ServerApp's final evaluation
        return self.evaluate_messages(server_round, arrays.to_torch_state_dict(), nodes,
                                      config)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """The example-weighted evaluation metrics of the checked replies; per site (or its
        failure) and bytes up in :attr:`evaluation`."""
        pending, self._evaluate = self._evaluate, None
        if pending is None or pending.round != server_round:
            return None
        metrics, per_site, up = self.check_evaluations(pending.by_node(replies))
        self.evaluation = (per_site, up)
        return MetricRecord(metrics) if metrics else None

    def summary(self) -> None:
        """What the run's strategy does, in the log."""
        fed, privacy = self.run.federation, self.run.privacy
        share = "every connected site" if fed.fraction_train >= 1 else \
            f"{fed.fraction_train:g} of the connected sites"
        log.info("strategy: %s%s; %s each round, at least %d; objective %s; client-level DP "
                 "%s; secure aggregation %s", fed.aggregation, " + FedBN" if fed.fedbn else "",
                 share, fed.min_train_nodes, self.run.objective.objective, privacy.client_dp,
                 privacy.secagg)

    # -- the ServerApp's round -------------------------------------------------------------
    def _start_round(self, rnd: int, state: dict[str, torch.Tensor],
                     config: ConfigRecord | None = None) -> _Exchange:
        """Sample, first contact, train messages; the round's exchange, kept until its
        replies are aggregated."""
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
        arrays = wire.encode_state(wire.pack_global(state, dtype))
        msgs = self.train_messages(rnd, nodes, arrays, sites, config)
        log.info("round %d: training on %d sites (teacher sent to %d)", rnd, len(nodes),
                 sum(s.teacher_sent for s in sites.values()))
        if ask:  # the first-contact query may have told a site's name
            self.live.round_sampled(rnd, {n: s.site_name for n, s in sites.items()})
        self.live.update(deadline=time.time() + self.run.federation.round_timeout)
        self._train = _Exchange(rnd, msgs, state, sites)
        return self._train

    def run_round(self, rnd: int, state: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], RoundReport]:
        """Train one round from ``state``, as the ServerApp does: :meth:`configure_train`'s
        work, the exchange within ``round-timeout`` (live.json follows each reply), then
        :meth:`aggregate_train` — or, under SecAgg+, its exchanges
        (:mod:`server.secagg`). Returns the new global state and the round's report."""
        pending = self._start_round(rnd, state)
        if self.run.privacy.secagg != "off":
            self._train = None
            new_state, report = self._secure_round(rnd, state, pending.messages,
                                                   pending.sites)
            self.report = report
            self._live_sites(report)
            return new_state, report

        def arrived(node: int, reply: Message) -> None:
            self.live.site(node, FAILED if reply.has_error() else OK)

        replies = exchange(self.grid, pending.messages, self.run.federation.round_timeout,
                           on_reply=arrived, name=self.name, label=f"round {rnd}")
        arrays, _ = self.aggregate_train(rnd, [reply for _, reply in replies])
        assert self.report is not None
        if arrays is None:
            return state, self.report
        new = arrays.to_torch_state_dict()
        return {k: new[k] for k in state}, self.report

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
                site.num_examples = int(metrics.pop(wire.NUM_EXAMPLES, 0))
                site.metrics, site.status = metrics, OK
                if metrics.get(wire.TEACHER_CACHED):
                    self.confirmed.add(node)
            else:
                site.status = FAILED if result.failures.get(node) != "no reply" else NO_REPLY
                site.reason = result.failures.get(node)
                if site.reason == "missing-teacher":
                    self.confirmed.discard(node)
        report = RoundReport(rnd, [sites[n] for n in sorted(sites)], fed.min_train_nodes)
        if not report.finish(secure=True, aggregated=result.mean is not None) \
                or result.mean is None:
            return state, report
        new = self.aggregator.secure_mean(rnd, state, result.mean, len(report.ok_sites),
                                         self.connected)
        return new, report

    def _check_replies(self, replies: list[tuple[int, Message]],
                       reference: dict[str, torch.Tensor], sites: dict[int, SiteReport]
                       ) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
        updates, weights = [], []
        for node, reply in replies:
            site = sites[node]
            if reply.has_error():
                site.status, site.reason = FAILED, wire.error_reason(reply)
                if site.reason == "missing-teacher":
                    self.confirmed.discard(node)
                continue
            site.bytes_up += record_nbytes(reply.content)
            problems = wire.check_site_reply(reply.content, wire.TRAIN, set(reference))
            if problems:
                site.status, site.reason = REJECTED, f"protocol: {problems[0]}"
                continue
            if wire.EVAL_METRICS in reply.content:
                site.incoming_eval = dict(reply.content[wire.EVAL_METRICS])
            try:
                sent = wire.decode_state(wire.state_blob(reply.content[wire.ARRAYS]))
            except ValueError as exc:
                site.status, site.reason = REJECTED, f"protocol: {exc}"
                continue
            update = wire.unpack_update(sent, reference)
            metrics = dict(reply.content[wire.METRICS])
            site.num_examples = int(metrics.pop(wire.NUM_EXAMPLES, 0))
            site.metrics = metrics
            if metrics.get(wire.TEACHER_CACHED):
                self.confirmed.add(node)
            problem = check_update(update, reference, self.local_keys) or \
                self.aggregator.check(update, reference)
            if problem or site.num_examples <= 0:
                site.status, site.reason = REJECTED, problem or "no training examples"
                continue
            site.status = OK
            updates.append(update)
            weights.append(float(site.num_examples))
        return updates, weights

    # -- final evaluation ------------------------------------------------------------------
    def evaluate_messages(self, rnd: int, state: dict[str, torch.Tensor], nodes: list[int],
                          config: ConfigRecord | None = None) -> list[Message]:
        """One evaluate message of ``state`` per node (kept for :meth:`aggregate_evaluate`)."""
        arrays = wire.pack_global(state, self.run.federation.transfer_dtype)
        own = ConfigRecord(dict(config or {}))
        own[wire.SERVER_ROUND] = rnd
        content = RecordDict({wire.ARRAYS: wire.encode_state(arrays), wire.CONFIG: own})
        msgs = to_nodes(content, nodes, MessageType.EVALUATE)
        self._evaluate = _Exchange(rnd, msgs)
        return msgs

    def evaluate(self, rnd: int, state: dict[str, torch.Tensor], nodes: list[int]
                 ) -> tuple[dict[str, float] | None, dict[str, dict], int, int]:
        """Score ``state`` on the validation split of ``nodes`` (after the last round), as
        :meth:`configure_evaluate` and :meth:`aggregate_evaluate` do, within
        ``round-timeout``. Returns the weighted metrics, per-site metrics (or failure), bytes
        down and up."""
        msgs = self.evaluate_messages(rnd, state, nodes)
        replies = exchange(self.grid, msgs, self.run.federation.round_timeout, name=self.name,
                           label="final evaluation")
        metrics = self.aggregate_evaluate(rnd, [reply for _, reply in replies])
        per_site, up = self.evaluation
        down = sum(record_nbytes(m.content) for m in msgs)
        return (dict(metrics) if metrics is not None else None), per_site, down, up

    def check_evaluations(self, replies: list[tuple[int, Message]]
                          ) -> tuple[dict[str, float] | None, dict[str, dict], int]:
        """Weighted metrics, per-site metrics (or failure) and bytes up of evaluate replies."""
        up, per_site = 0, {}
        for node, reply in replies:
            name = self.name(node)
            if reply.has_error():
                per_site[str(node)] = {"status": FAILED, "reason": wire.error_reason(reply),
                                       "site-name": name}
                continue
            up += record_nbytes(reply.content)
            problems = wire.check_site_reply(reply.content, wire.EVALUATE)
            if problems:
                per_site[str(node)] = {"status": REJECTED, "site-name": name,
                                       "reason": f"protocol: {problems[0]}"}
                continue
            per_site[str(node)] = {**dict(reply.content[wire.METRICS]), "site-name": name}
        rows = [{k: v for k, v in m.items() if k != "site-name"}
                for m in per_site.values() if "status" not in m]
        return weighted_means(rows), per_site, up


def rng_json(state: tuple) -> list:
    """A :class:`random.Random` state as JSON (results.json's ``server_state``)."""
    return [state[0], list(state[1]), state[2]]
