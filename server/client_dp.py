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

With ``client-dp-clipping = adaptive`` the clipping norm follows a quantile of the sites'
update norms (Andrew et al., "Differentially private learning with adaptive clipping", 2021):
each round the coordinator marks each update ``b_i = 1`` when it was within the norm ``C_t``
(server-clipping: measured before it clips; site-clipping: an update the site did not have to
shrink arrives with a norm below ``C_t``), releases the *centred* count ``Σ_i (b_i − ½)`` with
Gaussian noise of std ``σ_b``, turns it into a fraction over a fixed denominator, the run's
expected number of sites ``M`` (``min-train-nodes``), ``b̃ = (Σ_i (b_i − ½) + N(0, σ_b²)) / M
+ ½``, and moves the norm geometrically, ``C_{t+1} = C_t·exp(−η·(b̃ − γ))``.

The sensitivity, derived (add or remove one site): the clipped sum of updates moves by at most
``C_t`` in L2; the centred count moves by ``b − ½ = ±½`` (a 0/1 count would move by 1, and a
fraction over the *actual* number of sites moves by up to ``1/m`` of a changed denominator as
well). In units of their noise the pair moves by at most ``sqrt((C_t / (z_Δ·C_t))² + (½ /
σ_b)²)``, which is ``1/z`` when the update is noised with ``z_Δ = (z⁻² − (2σ_b)⁻²)^{-1/2}``
(Flower's ``compute_adaptive_noise_params``, whose factor 2 is this ½): the round is one
Gaussian mechanism of multiplier ``z``, as accounted. The update noise is drawn at the norm
``C_t`` the updates were clipped to. With more sites than ``M`` the fraction overshoots (the
norm moves faster), never the guarantee. Flower's own adaptive wrappers are not used: they move the
norm *before* drawing the update's noise and scale it by ``C_{t+1}``, which under-noises the
round whenever the norm shrinks. Under site-clipping each train message carries ``C_t``.

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

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from moma_protocol.clipping import NORM_SLACK, clip_update, update_norm
from moma_protocol.settings import PrivacySettings
from moma_protocol.wire import ARRAYS
from server.flwr_compat import compute_adaptive_noise_params

#: an update measured this far below C_t was not shrunk by its site (a clipped one measures C_t
#: up to float32 rounding)
UNCLIPPED_BELOW = 1e-5


def centred_count(within: int, sites: int) -> float:
    """Σ_i (b_i − ½) over ``sites`` updates of which ``within`` needed no clipping: adding or
    removing one site moves it by exactly ½ (the sensitivity the noise split assumes)."""
    return within - sites / 2


@dataclass(frozen=True)
class Release:
    """One noised aggregate: its noise multiplier (the round's, count noise included), how
    many sites it averaged and the clipping norm its updates were bounded by."""

    noise_multiplier: float
    sites: int
    clipping_norm: float = 0.0


class ClientDP:
    """One run's client-level DP: the Flower wrapper doing the arithmetic, and the account."""

    def __init__(self, privacy: PrivacySettings, strategy: FedAvg,
                 expected_sites: int = 1) -> None:
        if privacy.client_dp not in ("server-clipping", "site-clipping"):
            raise ValueError(f"client-dp {privacy.client_dp!r} is not a client-level DP mode")
        self.mode = privacy.client_dp
        self.noise_multiplier = privacy.client_dp_noise_multiplier
        self.clipping_norm = privacy.client_dp_clipping_norm  # C_t: the norm of this round
        self.delta = privacy.client_dp_delta
        self.adaptive = privacy.client_dp_clipping == "adaptive"
        self.update_noise_multiplier = self.noise_multiplier
        self.count_stddev = 0.0
        self.expected_sites = max(int(expected_sites), 1)  # M: the count's fixed denominator
        if self.adaptive:
            self.target_quantile = privacy.client_dp_target_quantile
            self.clip_lr = privacy.client_dp_clip_lr
            self.count_stddev, self.update_noise_multiplier = compute_adaptive_noise_params(
                self.noise_multiplier, expected_sites, privacy.count_stddev(expected_sites))
        # the number of sites is set per round to those actually aggregated: the noise is
        # calibrated to the mean it is added to
        self.wrapper = DifferentialPrivacyClientSideFixedClipping(
            strategy, self.update_noise_multiplier, self.clipping_norm, 1)
        self.releases: list[Release] = []
        self.population = 0  # most sites seen connected (reporting; no amplification)

    def check(self, update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
              ) -> str | None:
        """site-clipping: why ``update`` breaks the clipping bound, or None."""
        if self.mode != "site-clipping":
            return None
        norm = update_norm(update, reference)
        if norm > self.clipping_norm * (1 + NORM_SLACK):
            return (f"update norm {norm:.4g} is above the round's clipping norm "
                    f"{self.clipping_norm:g} (client-dp = site-clipping)")
        return None

    def round_norm(self) -> float | None:
        """The clipping norm a site-clipping site must apply this round (in the train
        message), or None when the coordinator clips."""
        return self.clipping_norm if self.mode == "site-clipping" else None

    def aggregate(self, server_round: int, replies: list[Message],
                  reference: dict[str, np.ndarray], population: int) -> ArrayRecord:
        """Clip (server-clipping), average uniformly, add noise at the round's norm ``C_t``;
        count the release; adaptive: then move the norm for the next round."""
        norm = self.clipping_norm
        start = {k: torch.from_numpy(np.asarray(v)) for k, v in reference.items()}
        within = 0  # updates that needed no shrinking
        for reply in replies:
            sent = reply.content[ARRAYS].to_torch_state_dict()
            measured = update_norm(sent, start)
            if self.mode == "server-clipping":
                within += measured <= norm
                clipped = clip_update(sent, start, norm)
                reply.content[ARRAYS] = ArrayRecord(
                    {k: Array(clipped[k].numpy()) for k in sent})
            else:
                within += measured < norm * (1 - UNCLIPPED_BELOW)
        self.wrapper.num_sampled_clients = len(replies)
        self.wrapper.clipping_norm = norm
        self.wrapper.noise_multiplier = self.update_noise_multiplier
        # Flower draws the noise from numpy's global generator: whatever seeded it before (a
        # run seed is public in results.json) must not predict the noise, so it is reseeded
        # from the operating system's entropy for every release
        np.random.seed()
        arrays, _ = self.wrapper.aggregate_train(server_round, replies)
        if arrays is None:
            raise ValueError("the private aggregation produced nothing")
        self.population = max(self.population, population, len(replies))
        self.releases.append(Release(self.noise_multiplier, len(replies), norm))
        if self.adaptive:
            self.adapt(within, len(replies))
        return arrays

    def noise_mean(self, mean: dict[str, np.ndarray], sites: int, population: int
                   ) -> dict[str, np.ndarray]:
        """Secure aggregation: Gaussian noise of std z·C/m on the mean of ``sites`` changes
        the sites clipped themselves (site-clipping; the coordinator cannot check them), by
        Flower's ``compute_stdv``/``add_gaussian_noise_inplace``; the release is counted."""
        from server.flwr_compat import add_gaussian_noise_inplace, compute_stdv

        if self.mode != "site-clipping" or self.adaptive:
            raise ValueError("secure aggregation needs client-dp site-clipping, fixed norm")
        keys = list(mean)
        arrays = [np.array(mean[k], dtype=np.float32, copy=True) for k in keys]
        np.random.seed()  # as in aggregate: no run seed predicts the noise
        add_gaussian_noise_inplace(arrays, compute_stdv(self.update_noise_multiplier,
                                                        self.clipping_norm, sites))
        self.population = max(self.population, population, sites)
        self.releases.append(Release(self.noise_multiplier, sites, self.clipping_norm))
        return dict(zip(keys, arrays, strict=True))

    def adapt(self, within: int, sites: int) -> None:
        """Andrew et al.'s geometric step from the noised fraction of unclipped updates:
        :func:`centred_count` plus N(0, σ_b²), over the fixed ``M``, plus ½."""
        noised = centred_count(within, sites) + float(np.random.normal(0.0, self.count_stddev))
        fraction = noised / self.expected_sites + 0.5
        self.clipping_norm *= math.exp(-self.clip_lr * (fraction - self.target_quantile))

    # -- the account -----------------------------------------------------------------------
    def spent(self) -> dict:
        """The run's client-level (ε, δ) so far, by Flower's RDP accountant."""
        from flwr.serverapp import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            RdpAccountant,
            SamplingMethod,
        )

        out = {"unit": "site", "mechanism": f"gaussian, {self.mode}",
               "noise-multiplier": self.noise_multiplier,
               "clipping": "adaptive" if self.adaptive else "fixed",
               "clipping-norm": self.releases[-1].clipping_norm if self.releases
               else self.clipping_norm,
               "delta": self.delta, "releases": len(self.releases), "epsilon": 0.0,
               "accountant": "flower rdp (no amplification, add-or-remove-one site)"}
        if self.adaptive:
            out.update({"next-clipping-norm": self.clipping_norm,
                        "update-noise-multiplier": self.update_noise_multiplier,
                        "count-stddev": self.count_stddev})
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
        return {"population": self.population, "clipping-norm": self.clipping_norm,
                "releases": [[r.noise_multiplier, r.sites, r.clipping_norm]
                             for r in self.releases]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (a resumed run continues its account)."""
        try:
            releases = [Release(float(r[0]), int(r[1]), float(r[2]) if len(r) > 2 else 0.0)
                        for r in state["releases"]]
            population = int(state["population"])
            norm = float(state.get("clipping-norm", self.clipping_norm))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError("client-level DP account is unreadable") from exc
        if any(not r.noise_multiplier > 0 or r.sites < 1 for r in releases) or (
                releases and population < max(r.sites for r in releases)):
            raise ValueError("client-level DP account holds impossible releases")
        if not (norm > 0 and math.isfinite(norm)):
            raise ValueError("client-level DP account holds an impossible clipping norm")
        self.releases, self.population = releases, population
        if self.adaptive:  # a fixed norm stays the run's setting
            self.clipping_norm = norm
