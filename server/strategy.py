"""MoMA-FL's Flower strategy: FedAvg's message flow plus teacher shipping and update checks.

* configure_train: asks each sampled site whether it holds the teacher (``query.teacher_status``)
  and attaches the teacher only to the sites that lack it; every train message names the
  teacher's SHA-256.
* Every reply is checked on receipt with the protocol's own checks
  (:func:`client.protocol.check_site_reply`, :func:`client.protocol.check_error_reply`): a reply
  outside the protocol is rejected as ``protocol: <fixed text>``, an error reply is recorded by
  its category only (``unknown-error`` when its reason is not one) — nothing a site chose to
  write reaches the results.
* aggregate_train: rejects replies whose tensors are non-finite or mis-shaped, then aggregates
  key-wise with the run's method (weighted FedAvg/FedProx, coordinate median, trimmed mean).
  Under FedBN sites keep their normalisation layers (:func:`client.site_training.local_keys`):
  updates leave them out and the global model keeps its values for them.
* Per round it records, per site, what was sent and received (bytes), examples and metrics, and
  which sites failed and why, in ``self.round_log`` for the results file.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from client import protocol as P
from client.site_training import local_keys
from moma_core.config import RunConfig
from moma_core.models import Architecture, build_model
from server.aggregation import aggregate, check_update
from server.teacher_package import TeacherPackage

log = logging.getLogger("moma.server")


def record_nbytes(content: RecordDict) -> int:
    """Bytes of the arrays in a message plus the size of its config/metric values."""
    total = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += sum(len(a.data) for a in rec.values())
        else:
            total += sum(len(str(k)) + len(str(v)) for k, v in rec.items())
    return total


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Connected node ids, waiting up to ``timeout`` seconds for ``minimum`` of them."""
    deadline = time.time() + timeout
    nodes = list(grid.get_node_ids())
    last_report = 0.0
    while len(nodes) < minimum and time.time() < deadline:
        if time.time() - last_report > 30:
            log.info("waiting for sites: %d of %d connected", len(nodes), minimum)
            last_report = time.time()
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    return nodes


def exchange(grid: Grid, messages: list[Message], timeout: float, poll: float = 0.2
             ) -> list[tuple[int, Message]]:
    """Send and collect replies as (destination node, reply), polling every ``poll`` s.

    An error reply made by the SuperLink for a vanished node carries the SuperLink as its
    source, so replies are matched to nodes by the id of the message they answer. A node that
    does not answer within ``timeout`` is simply absent from the result.
    """
    if not messages:
        return []
    ids = list(grid.push_messages(messages))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}
    pending, out, deadline = set(ids), [], time.time() + timeout
    while pending and time.time() < deadline:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                pending.discard(mid)
                out.append((node_of[mid], reply))
        if pending:
            time.sleep(poll)
    return out


class MomaStrategy(FedAvg):
    """See module docstring."""

    def __init__(self, run: RunConfig, teacher: TeacherPackage | None) -> None:
        super().__init__(fraction_train=run.fraction_train,
                         fraction_evaluate=run.fraction_evaluate,
                         min_train_nodes=run.min_train_nodes,
                         min_evaluate_nodes=min(run.min_train_nodes, run.min_available_nodes),
                         min_available_nodes=run.min_available_nodes,
                         weighted_by_key=P.NUM_EXAMPLES)
        self.run = run
        self.teacher = teacher
        self.rng = random.Random(run.seed)
        self.round_log: dict[int, dict] = {}
        self.sent_to: dict[int, dict] = {}
        self.site_names: dict[int, str] = {}
        self.names_registered = False  # True: names come from the registered keys only
        self._reference: dict[str, torch.Tensor] | None = None
        self.local_keys: set[str] = set()  # what sites keep to themselves (FedBN)
        if run.fedbn:
            arch = Architecture(run.student_model, run.class_names, run.image_size)
            self.local_keys = local_keys(run, build_model(arch))

    # -- training ---------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float) -> list[int]:
        nodes = wait_for_nodes(grid, self.run.min_available_nodes, self.run.round_timeout)
        if len(nodes) < self.run.min_train_nodes:
            raise RuntimeError(
                f"only {len(nodes)} site(s) connected after {self.run.round_timeout:.0f} s; "
                f"the run needs at least {self.run.min_train_nodes} (min-train-nodes). The "
                "completed rounds are saved: start again with --resume")
        size = min(len(nodes), max(int(len(nodes) * fraction), self.run.min_train_nodes))
        return sorted(self.rng.sample(nodes, size)) if nodes else []

    def teacher_status(self, grid: Grid, nodes: list[int]) -> dict[int, bool]:
        """Ask sites whether their cache holds the teacher (unanswered: assume not)."""
        sha = self.teacher.sha256 if self.teacher is not None else ""
        content = RecordDict({P.CONFIG: ConfigRecord({P.TEACHER_SHA: sha})})
        msgs = [Message(content, dst_node_id=n, message_type=P.TEACHER_STATUS) for n in nodes]
        status = {n: False for n in nodes}
        for node, reply in exchange(grid, msgs, timeout=min(120.0, self.run.round_timeout)):
            if reply.has_error():
                log.warning("node %d: teacher status query failed: %s", node,
                            P.error_reason(reply))
                continue
            problems = P.check_site_reply(reply.content, P.TEACHER_STATUS)
            if problems:
                log.warning("node %d: teacher status reply rejected: protocol: %s", node,
                            problems[0])
                continue
            status[node] = bool(reply.content[P.METRICS][P.HAS_TEACHER])
            if P.CONFIG in reply.content and not self.names_registered:
                self.site_names[node] = str(reply.content[P.CONFIG].get(P.SITE_NAME, node))
        return status

    def set_registered_names(self, names: dict[str, str]) -> None:
        """Name sites by the key they were registered with (node id → name); what a site
        says of itself is then ignored."""
        self.site_names = {int(k): str(v) for k, v in names.items()}
        self.names_registered = True

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._reference = arrays.to_torch_state_dict()
        nodes = self._sample(grid, self.run.fraction_train)
        has_teacher = self.teacher_status(grid, nodes)
        config = ConfigRecord({**dict(config), **self.run.to_flat(),
                               "server-round": server_round,
                               P.TEACHER_SHA: self.teacher.sha256 if self.teacher else ""})
        messages, self.sent_to = [], {}
        for node in nodes:
            records = {P.ARRAYS: arrays, P.CONFIG: config}
            if self.teacher is not None and not has_teacher[node]:
                records.update(self.teacher.records())
            content = RecordDict(records)
            self.sent_to[node] = {"site_name": self.site_names.get(node, str(node)),
                                  "bytes_down": record_nbytes(content),
                                  "teacher_sent": P.TEACHER in records}
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        log.info("round %d: training on %d sites (teacher sent to %d)", server_round,
                 len(nodes), sum(v["teacher_sent"] for v in self.sent_to.values()))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[tuple[int, Message]]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the acceptable updates among ``(node, reply)`` pairs (see :func:`exchange`)."""
        sites = {n: {**info, "status": "no reply"} for n, info in self.sent_to.items()}
        updates, weights, metrics = [], [], []
        for node, reply in replies:
            site = sites.setdefault(node, {})
            if reply.has_error():
                site.update(status="failed", reason=P.error_reason(reply))
                continue
            site["bytes_up"] = record_nbytes(reply.content)
            problems = P.check_site_reply(reply.content, P.TRAIN, set(self._reference or {}))
            if problems:
                site.update(status="rejected", reason=f"protocol: {problems[0]}")
                continue
            update = reply.content[P.ARRAYS].to_torch_state_dict()
            problem = check_update(update, self._reference or {}, self.local_keys)
            m = dict(reply.content[P.METRICS])
            site["metrics"] = m
            site["num_examples"] = int(m.get(P.NUM_EXAMPLES, 0))
            if problem or site["num_examples"] <= 0:
                problem = problem or "no training examples"
                site.update(status="rejected", reason=problem)
                log.warning("round %d: update of node %d rejected: %s", server_round, node,
                            problem)
                continue
            site["status"] = "ok"
            updates.append(update)
            weights.append(float(site["num_examples"]))
            metrics.append(m)
        for node, site in sites.items():
            if site["status"] != "ok":
                log.warning("round %d: node %d %s%s", server_round, node, site["status"],
                            f": {site.get('reason')}" if site.get("reason") else "")
        self.round_log[server_round] = {"sites": sites}
        if not updates:
            return None, None
        new = aggregate(updates, weights, self.run.aggregation, self.run.trim_fraction,
                        reference=self._reference)
        total = sum(weights)
        avg = {}
        for k in dict.fromkeys(k for m in metrics for k in m if k != P.NUM_EXAMPLES):
            pairs = [(float(m[k]), w) for m, w in zip(metrics, weights, strict=True) if k in m]
            avg[k] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
        avg[P.NUM_EXAMPLES] = total
        return ArrayRecord(new), MetricRecord(avg)

    # -- evaluation -------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.run.fraction_evaluate <= 0:
            return []
        trained = self.round_log.get(server_round, {}).get("sites", {})
        nodes = sorted(n for n, s in trained.items() if s.get("status") == "ok") \
            or sorted(grid.get_node_ids())
        config = ConfigRecord({**dict(config), **self.run.to_flat(),
                               "server-round": server_round})
        content = RecordDict({P.ARRAYS: arrays, P.CONFIG: config})
        return [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE)
                for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[tuple[int, Message]]
                           ) -> MetricRecord | None:
        per_site, total, sums = {}, 0.0, {}
        for node, reply in replies:
            name = self.site_names.get(node, str(node))
            if reply.has_error():
                per_site[node] = {"status": "failed", "reason": P.error_reason(reply),
                                  "site-name": name}
                continue
            problems = P.check_site_reply(reply.content, P.EVALUATE)
            if problems:
                per_site[node] = {"status": "rejected", "reason": f"protocol: {problems[0]}",
                                  "site-name": name}
                log.warning("round %d: evaluation of node %d rejected: protocol: %s",
                            server_round, node, problems[0])
                continue
            m = dict(reply.content[P.METRICS])
            per_site[node] = {**m, "site-name": name}
            n = float(m.get(P.NUM_EXAMPLES, 0))
            total += n
            for k, v in m.items():
                if k != P.NUM_EXAMPLES:
                    sums[k] = sums.get(k, 0.0) + float(v) * n
        self.round_log.setdefault(server_round, {})["evaluate"] = per_site
        if total <= 0:
            return None
        return MetricRecord({**{k: v / total for k, v in sums.items()}, P.NUM_EXAMPLES: total})
