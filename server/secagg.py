"""The coordinator's side of a secure-aggregation round (``secagg = "secaggplus"``).

The train exchange of a round runs Flower's ``SecAggPlusWorkflow`` (its four stages and its
unmasking, unchanged) with MoMA-FL's own train messages in place of the legacy fit
instructions: each site receives exactly what it would without secure aggregation (the global
student, the round's fields, the teacher where it lacks it) plus the protocol's values, and
answers with its masked, weighted change of the student (:mod:`client.secagg_site`). What the
coordinator obtains is the weighted mean of the changes of the sites whose masked vectors it
collected — never one site's change — and each site's metrics (which, as without secure
aggregation, leave the site in the clear).

:class:`SecureExchange` runs one round. Every message passes through :class:`_CountingGrid`,
which sends it with :func:`server.transport.exchange`, counts each site's bytes, records its
failures by category (an error reply, or no reply within the round's timeout) and drops a
masked vector whose shapes are not those of the sent tensors (a site out of step with the run)
before it can spoil the sum: the protocol then treats that site as dropped. With fewer sites
left than a site's reconstruction threshold, Flower's workflow halts and the round has no
aggregate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from moma_protocol import secagg as secagg_protocol
from moma_protocol import wire
from moma_protocol.settings import PrivacySettings
from server.flwr_compat import Key, Stage
from server.transport import exchange, record_nbytes

log = logging.getLogger("moma.server")

MODULUS_RANGE = 1 << 32
QUANTIZATION_RANGE = 1 << 22


@dataclass
class SecureResult:
    """What one secure round gave the coordinator."""

    mean: dict[str, np.ndarray] | None  # the weighted mean change; None: no aggregate
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # node → its metrics
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)  # node → category or "no reply"


class _Proxy:
    """The node handle Flower's legacy fit path expects (only its id is used)."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)


class _Collector:
    """The legacy strategy Flower's workflow calls: the sites are chosen, the result kept."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.results: list = []
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns, Parameters

        return [(_Proxy(n), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        self.results = list(results)
        if results:  # every result carries the unmasked weighted mean (Flower's workflow)
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            return results[0][1].parameters, {}
        return None, {}


class _CountingGrid:
    """The round's grid as Flower's workflow sees it (see module docstring)."""

    def __init__(self, grid: Grid, timeout: float, shapes: list[tuple[int, ...]],
                 result: SecureResult) -> None:
        self.grid, self.timeout, self.shapes, self.result = grid, timeout, shapes, result

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        r = self.result
        # Flower sends one stage a call
        stages = {secagg_protocol.stage_of(m.content) for m in messages}
        stage = stages.pop() if len(stages) == 1 else ""
        for m in messages:
            node = m.metadata.dst_node_id
            r.bytes_down[node] = r.bytes_down.get(node, 0) + record_nbytes(m.content)
        replies = exchange(self.grid, messages, self.timeout)
        answered, out = set(), []
        for node, reply in replies:
            answered.add(node)
            if reply.has_error():
                r.failures.setdefault(node, wire.error_reason(reply))
                continue
            r.bytes_up[node] = r.bytes_up.get(node, 0) + record_nbytes(reply.content)
            problem = self._problem(reply, stage)
            if problem:
                log.warning("site %d: %s; it is left out of the secure sum", node, problem)
                r.failures.setdefault(node, f"protocol: {problem}")
                continue
            out.append(reply)
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                r.failures.setdefault(m.metadata.dst_node_id, "no reply")
        return out

    def _problem(self, reply: Message, stage: str) -> str | None:
        """Why a site's reply to ``stage`` must not reach Flower's workflow, or None: the
        protocol's own checks (:func:`moma_protocol.secagg.check_secagg_reply`), then the
        masked vector's shapes, which must be the sent tensors' (a vector of other shapes would
        spoil the sum of every site)."""
        problems = secagg_protocol.check_secagg_reply(reply.content, stage)
        if problems:
            return problems[0]
        if stage == Stage.COLLECT_MASKED_VECTORS:
            from flwr.common import bytes_to_ndarray

            masked = reply.content.config_records[secagg_protocol.CONFIGS][Key.MASKED_PARAMETERS]
            try:
                shapes = [tuple(bytes_to_ndarray(b).shape) for b in masked]
            except (TypeError, ValueError):
                return "unreadable masked vector"
            if shapes != self.shapes:
                return "masked vector of the wrong shapes"
        return None


class SecureExchange:
    """One round's train exchange under SecAgg+ (see module docstring)."""

    def __init__(self, privacy: PrivacySettings, timeout: float) -> None:
        self.privacy = privacy
        self.timeout = timeout

    def workflow(self):
        from server.flwr_compat import SecAggPlusWorkflow

        p = self.privacy
        return SecAggPlusWorkflow(num_shares=float(p.secagg_share_fraction),
                                  reconstruction_threshold=float(p.secagg_threshold),
                                  max_weight=float(p.secagg_max_weight),
                                  clipping_range=float(p.secagg_clipping_range),
                                  quantization_range=QUANTIZATION_RANGE,
                                  modulus_range=MODULUS_RANGE, timeout=self.timeout)

    def run(self, grid: Grid, server_round: int, contents: dict[int, RecordDict],
            reference: dict[str, tuple[int, ...]], keys: list[str]) -> SecureResult:
        """Run the protocol with ``contents`` (node → its train message content) over the
        sent tensors ``keys`` of shapes ``reference``; see :class:`SecureResult`."""
        from server.flwr_compat import secaggplus_context, train_on_contents

        secagg_protocol.install_secure_masks()
        result = SecureResult(None)
        nodes = sorted(contents)
        collector = _Collector(nodes)
        context = secaggplus_context(collector, server_round)
        workflow = self.workflow()
        train_on_contents(workflow, contents)
        shapes = secagg_protocol.expected_shapes(reference, keys)
        counting = _CountingGrid(grid, self.timeout, shapes, result)
        workflow(counting, context)  # type: ignore[arg-type]
        for proxy, fit in collector.results:
            result.metrics[proxy.node_id] = {k: float(v) for k, v in fit.metrics.items()}
        aggregated = {proxy.node_id for proxy, _ in collector.results}
        for node in nodes:
            if node not in aggregated:
                result.failures.setdefault(node, "secure aggregation: left out")
        if collector.mean is not None and collector.results:
            arrays = collector.mean
            order = secagg_protocol.tensor_order(keys)
            if len(arrays) != len(order) or any(
                    tuple(a.shape) != tuple(reference[k]) for a, k in zip(arrays, order,
                                                                          strict=False)):
                log.error("round %d: the unmasked sum has the wrong shapes", server_round)
            elif not all(np.isfinite(a).all() for a in arrays):
                log.error("round %d: the unmasked sum is not finite", server_round)
            else:
                result.mean = {k: np.asarray(a, dtype=np.float32)
                               for k, a in zip(order, arrays, strict=True)}
        if result.mean is None:
            for node in nodes:  # no aggregate: nobody's update counted
                result.failures.setdefault(node, "secure aggregation: no aggregate")
            result.metrics = {}
        return result
