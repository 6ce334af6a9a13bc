"""Client-level differential privacy of the aggregate (DP-FedAvg), with Flower's wrappers.

``client-dp`` (:class:`moma_protocol.settings.PrivacySettings`) makes the aggregate of a round
a Gaussian mechanism over the sites, with Flower's arithmetic:

- ``server-clipping``: the coordinator clips each site's change of the global student to L2
  norm ``C`` (all sent tensors as one vector; Flower's ``compute_clip_model_update``, as in its
  ``DifferentialPrivacyServerSideFixedClipping``, which itself divides by the norm and so
  crashes on a site that sends the student back unchanged);
- ``site-clipping``: each site clips its own change before it sends it
  (:func:`moma_protocol.clipping.clip_update`, what Flower's ``fixedclipping_mod`` does); the
  coordinator checks the bound (:meth:`ClientDP.check`: an update beyond ``C`` is rejected,
  never averaged).

Then Flower's :class:`DifferentialPrivacyClientSideFixedClipping` wrapper averages the clipped
updates uniformly (FedAvg, every site weighs the same) and adds Gaussian noise of standard
deviation ``z·C/m`` to the mean (``m``: the sites aggregated this round, so the noise fits the
mean it is added to).

The guarantee is about a *site*: whether one site took part changes the released global student
only within (ε, δ). It is accounted with Flower's RDP accountant (``flwr[dp]``, Google's
``dp-accounting``): one Gaussian release of multiplier ``z`` per aggregated round, no
amplification by sampling (sites are not sampled at random from a large population), under the
add-or-remove-one-site relation; the results' privacy section reports the (ε, δ) after every
round. The noise comes from numpy's global Mersenne-Twister generator (Flower's), reseeded
from the operating system's entropy before each release so that no run seed predicts it; it
is not a cryptographically secure generator. Not covered: the coordinator still sees every
update before the noise (only secure aggregation hides it), and the metrics the sites report
(losses, accuracy, example counts) leave the site without noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from moma_protocol.clipping import NORM_SLACK, clip_update, update_norm
from moma_protocol.settings import PrivacySettings
from moma_protocol.wire import ARRAYS


@dataclass(frozen=True)
class Release:
    """One noised aggregate: its noise multiplier and how many sites it averaged."""

    noise_multiplier: float
    sites: int


class ClientDP:
    """One run's client-level DP: the Flower wrapper doing the arithmetic, and the account."""

    def __init__(self, privacy: PrivacySettings, strategy: FedAvg) -> None:
        if privacy.client_dp not in ("server-clipping", "site-clipping"):
            raise ValueError(f"client-dp {privacy.client_dp!r} is not a client-level DP mode")
        self.mode = privacy.client_dp
        self.noise_multiplier = privacy.client_dp_noise_multiplier
        self.clipping_norm = privacy.client_dp_clipping_norm
        self.delta = privacy.client_dp_delta
        # the number of sites is set per round to those actually aggregated: the noise is
        # calibrated to the mean it is added to
        self.wrapper = DifferentialPrivacyClientSideFixedClipping(
            strategy, self.noise_multiplier, self.clipping_norm, 1)
        self.releases: list[Release] = []
        self.population = 0  # most sites seen connected (reporting; no amplification)

    def check(self, update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
              ) -> str | None:
        """site-clipping: why ``update`` breaks the clipping bound, or None."""
        if self.mode != "site-clipping":
            return None
        norm = update_norm(update, reference)
        if norm > self.clipping_norm * (1 + NORM_SLACK):
            return (f"update norm {norm:.4g} is above the run's clipping norm "
                    f"{self.clipping_norm:g} (client-dp = site-clipping)")
        return None

    def aggregate(self, server_round: int, replies: list[Message],
                  reference: dict[str, np.ndarray], population: int) -> ArrayRecord:
        """Clip (server-clipping), average uniformly, add noise; count the release."""
        if self.mode == "server-clipping":
            start = {k: torch.from_numpy(np.asarray(v)) for k, v in reference.items()}
            for reply in replies:
                sent = reply.content[ARRAYS].to_torch_state_dict()
                clipped = clip_update(sent, start, self.clipping_norm)
                reply.content[ARRAYS] = ArrayRecord(
                    {k: Array(clipped[k].numpy()) for k in sent})
        self.wrapper.num_sampled_clients = len(replies)
        # Flower draws the noise from numpy's global generator: whatever seeded it before (a
        # run seed is public in results.json) must not predict the noise, so it is reseeded
        # from the operating system's entropy for every release
        np.random.seed()
        arrays, _ = self.wrapper.aggregate_train(server_round, replies)
        if arrays is None:
            raise ValueError("the private aggregation produced nothing")
        self.population = max(self.population, population, len(replies))
        self.releases.append(Release(self.noise_multiplier, len(replies)))
        return arrays

    # -- the account -----------------------------------------------------------------------
    def spent(self) -> dict:
        """The run's client-level (ε, δ) so far, by Flower's RDP accountant."""
        from flwr.supercore.privacy_accounting import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            SamplingMethod,
        )
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        out = {"unit": "site", "mechanism": f"gaussian, {self.mode}",
               "noise-multiplier": self.noise_multiplier, "clipping-norm": self.clipping_norm,
               "delta": self.delta, "releases": len(self.releases), "epsilon": 0.0,
               "accountant": "flower rdp (no amplification, add-or-remove-one site)"}
        if not self.releases:
            return out
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=self.delta, population_size=self.population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        for r in self.releases:
            accountant.compose(GaussianPrivacyEvent(r.noise_multiplier, r.sites,
                                                    self.population))
        out["epsilon"] = accountant.get_privacy_spent().epsilon
        return out

    def state_dict(self) -> dict:
        return {"population": self.population,
                "releases": [[r.noise_multiplier, r.sites] for r in self.releases]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (a resumed run continues its account)."""
        try:
            releases = [Release(float(z), int(m)) for z, m in state["releases"]]
            population = int(state["population"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError("client-level DP account is unreadable") from exc
        if any(not r.noise_multiplier > 0 or r.sites < 1 for r in releases) or (
                releases and population < max(r.sites for r in releases)):
            raise ValueError("client-level DP account holds impossible releases")
        self.releases, self.population = releases, population
