"""Combining site updates: checks first, then Flower's own strategies.

Before anything is aggregated each update is checked against the global model
(:func:`check_update`): the same tensor names and shapes, finite values only — less the keys the
sites keep to themselves under FedBN (``local``), which an update must leave out. A failing
update is rejected and reported, never averaged.

The arithmetic is Flower's (:data:`METHODS`): each method is one factory from the run's settings
to a ``flwr.serverapp.strategy`` object whose ``aggregate_train`` combines the accepted updates
(weighted by examples). Adding a method is one entry here and its name in
:data:`moma_protocol.settings.AGGREGATIONS`. Keys no update carries (FedBN's local layers) keep
the global value. Stateful methods keep their state in the :class:`Aggregator`
(:meth:`Aggregator.state_dict`: FedAdam's first and second moments, FedAvgM's momentum), which
the coordinator saves with every round's checkpoint, so a resumed run continues them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg

from moma_protocol.settings import (
    AGGREGATIONS,
    CLIENT_DP_AGGREGATIONS,
    FederationSettings,
    PrivacySettings,
)
from moma_protocol.wire import ARRAYS, METRICS, NUM_EXAMPLES
from server.client_dp import ClientDP
from server.flwr_compat import AcceptedReply

#: aggregation name → Flower strategy holding its arithmetic.
METHODS: dict[str, Callable[[FederationSettings], FedAvg]] = {
    "fedavg": lambda f: FedAvg(weighted_by_key=NUM_EXAMPLES),
    # FedProx aggregates as FedAvg; its proximal term is added by each site's local loss
    "fedprox": lambda f: FedProx(proximal_mu=f.proximal_mu, weighted_by_key=NUM_EXAMPLES),
    "median": lambda f: FedMedian(weighted_by_key=NUM_EXAMPLES),
    "trimmed-mean": lambda f: FedTrimmedAvg(beta=f.trim_fraction,
                                            weighted_by_key=NUM_EXAMPLES),
    "fedadam": lambda f: FedAdam(eta=f.server_lr, weighted_by_key=NUM_EXAMPLES),
    # server momentum (Hsu et al. 2019): each step is the mean update plus beta times the last
    "fedavgm": lambda f: FedAvgM(server_learning_rate=1.0, server_momentum=f.server_momentum,
                                 weighted_by_key=NUM_EXAMPLES),
}
assert set(METHODS) == set(AGGREGATIONS), "every configurable aggregation has a method"


def check_update(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                 local: Collection[str] = ()) -> str | None:
    """Why ``update`` must be rejected, or None when it is acceptable.

    ``local``: keys a site keeps (FedBN's normalisation layers); an update must omit exactly
    those of them the reference has. The reason names only the reference's keys, never a name
    the site chose.
    """
    local = set(local)
    missing = [k for k in reference if k not in update and k not in local]
    extra = [k for k in update if k not in reference]
    if missing or extra:
        return f"tensor names differ (missing {missing[:3]}, {len(extra)} unexpected)"
    sent_local = [k for k in reference if k in update and k in local]
    if sent_local:
        return f"kept-local (FedBN) tensors were sent: {sent_local[:3]}"
    for k in update:
        ref = reference[k]
        if tuple(update[k].shape) != tuple(ref.shape):
            return f"tensor {k} has shape {tuple(update[k].shape)}, {tuple(ref.shape)} expected"
        if not torch.isfinite(update[k]).all():
            return f"tensor {k} contains NaN or Inf"
    return None


#: a checked update as Flower's ``aggregate_train`` reads a reply (why not a real Message:
#: :class:`server.flwr_compat.AcceptedReply`); the checks happened before
_Accepted = AcceptedReply


class Aggregator:
    """One run's aggregation method (see module docstring); with client-level DP
    (``privacy.client_dp``) Flower's DP wrapper around it (:mod:`server.client_dp`)."""

    def __init__(self, federation: FederationSettings,
                 privacy: PrivacySettings | None = None) -> None:
        if federation.aggregation not in METHODS:
            raise ValueError(f"unknown aggregation {federation.aggregation!r}")
        self.method = federation.aggregation
        self.strategy = METHODS[self.method](federation)
        self._momentum: dict[str, np.ndarray] = {}  # FedAvgM's, by tensor name
        self.client_dp: ClientDP | None = None
        if privacy is not None and privacy.client_dp != "off":
            if self.method not in CLIENT_DP_AGGREGATIONS:
                raise ValueError(f"client-level DP cannot wrap {self.method}")
            self.client_dp = ClientDP(privacy, cast(FedAvg, self.strategy),
                                     federation.min_train_nodes)

    def check(self, update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
              ) -> str | None:
        """Why the method refuses an update that passed :func:`check_update`, or None
        (site-clipping: an update beyond the clipping norm)."""
        return self.client_dp.check(update, reference) if self.client_dp else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's own state between rounds (FedAdam: ``m/<name>``, ``v/<name>``;
        FedAvgM: ``mom/<name>``)."""
        out = {}
        for prefix, attr in (("m/", "m_t"), ("v/", "v_t")):
            for k, v in (getattr(self.strategy, attr, None) or {}).items():
                out[prefix + k] = torch.from_numpy(np.array(v, copy=True))
        for k, v in self._momentum.items():
            out["mom/" + k] = torch.from_numpy(np.array(v, copy=True))
        return out

    def restore_client_dp(self, saved: dict) -> None:
        """A resumed run's client-level DP account (``saved["client_dp"]``) continues where it
        was, never restarts: a saved state without it (or with an unreadable one) stops the
        resume (ValueError). Without client-level DP there is nothing to restore."""
        if self.client_dp is None:
            return
        if "client_dp" not in saved:
            raise ValueError("the run uses client-dp but its saved state has no privacy "
                             "account: it cannot be resumed without under-counting")
        self.client_dp.load_state_dict(saved["client_dp"])

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (a resumed run); ValueError if it is not this method's."""
        moments: dict[str, dict] = {"m_t": {}, "v_t": {}, "momentum_vector": {}}
        for key, v in state.items():
            prefix, _, name = key.partition("/")
            attr = {"m": "m_t", "v": "v_t", "mom": "momentum_vector"}.get(prefix)
            if attr is None or not name or not hasattr(self.strategy, attr):
                raise ValueError(f"aggregator state {key!r} does not belong to {self.method}")
            moments[attr][name] = v.numpy().copy()
        self._momentum = moments.pop("momentum_vector")
        for attr, values in moments.items():
            if values:
                setattr(self.strategy, attr, values)

    def secure_mean(self, server_round: int, reference: dict[str, torch.Tensor],
                    mean: dict[str, np.ndarray], sites: int, population: int = 0
                    ) -> dict[str, torch.Tensor]:
        """The new global state from secure aggregation's weighted mean change ``mean`` (of
        ``sites`` sites): FedAvg's (and FedProx's) step, the only arithmetic on a sum; with
        client-level DP its Gaussian noise is added and the release counted."""
        if self.method not in CLIENT_DP_AGGREGATIONS:
            raise ValueError(f"secure aggregation cannot run {self.method}")
        change = {k: np.asarray(v, dtype=np.float32) for k, v in mean.items()}
        if self.client_dp is not None:
            change = self.client_dp.noise_mean(change, sites, population)
        out = {}
        for k, ref in reference.items():
            out[k] = (ref.detach().cpu().float() + torch.from_numpy(change[k])).to(ref.dtype) \
                if k in change else ref.detach().clone()
        return out

    def __call__(self, server_round: int, updates: list[dict[str, torch.Tensor]],
                 weights: list[float], reference: dict[str, torch.Tensor],
                 population: int = 0) -> dict[str, torch.Tensor]:
        """The new global state from checked updates (all carrying the same keys).

        With client-level DP the updates are averaged uniformly (``weights`` ignored) and
        ``population`` (sites connected) is recorded with the release.
        """
        if not updates:
            raise ValueError("nothing to aggregate")
        if any(not w > 0 for w in weights):
            raise ValueError("aggregation weights must be positive")
        sent = list(updates[0])
        if any(list(u) != sent and set(u) != set(sent) for u in updates):
            raise ValueError("updates carry different tensors")
        momentum = isinstance(self.strategy, FedAvgM)
        if momentum:  # steps from the global, its momentum in the order of the sent tensors
            self.strategy.current_arrays = ArrayRecord(
                {k: Array(reference[k].detach().cpu().numpy()) for k in sent})
            self.strategy.momentum_vector = [self._momentum[k] for k in sent] \
                if self._momentum and set(self._momentum) == set(sent) else None
        elif hasattr(self.strategy, "current_arrays"):  # server optimisers step from the global
            self.strategy.current_arrays = {k: reference[k].numpy() for k in sent}
        if self.client_dp is not None:
            weights = [1.0] * len(updates)  # DP-FedAvg: every site counts the same
        replies = [_Accepted(RecordDict({ARRAYS: ArrayRecord({k: u[k] for k in sent}),
                                         METRICS: MetricRecord({NUM_EXAMPLES: float(w)})}))
                   for u, w in zip(updates, weights, strict=True)]
        if self.client_dp is not None:
            arrays = self.client_dp.aggregate(
                server_round, cast(list[Message], replies),
                {k: reference[k].detach().cpu().numpy() for k in sent}, population)
        else:
            arrays, _ = self.strategy.aggregate_train(server_round,
                                                      cast(list[Message], replies))
        if arrays is None:
            raise ValueError("the aggregation produced nothing")
        if momentum and self.strategy.momentum_vector is not None:
            self._momentum = {k: np.array(v, copy=True)
                              for k, v in zip(sent, self.strategy.momentum_vector, strict=True)}
        new = arrays.to_torch_state_dict()
        out = {}
        for k, ref in reference.items():
            out[k] = new[k].to(ref.dtype) if k in new else ref.detach().clone()
        return out
