"""Client-level DP (Flower's fixed-clipping wrappers): clipping, noise, the coordinator's check
of site-clipped updates, the account and its resumption, the results' privacy section."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moma_protocol.clipping import clip_update, update_norm
from moma_protocol.settings import ConfigError, FederationSettings, PrivacySettings, RunConfig
from server.aggregation import Aggregator
from server.client_dp import ClientDP, Release, centred_count
from server.results import privacy_lines, privacy_summary


def _privacy(mode: str, z: float = 1.0, c: float = 1.0, delta: float = 1e-5) -> PrivacySettings:
    return PrivacySettings(client_dp=mode, client_dp_noise_multiplier=z,
                           client_dp_clipping_norm=c, client_dp_delta=delta)


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(40, 30, generator=g) * scale,
            "b": torch.randn(30, generator=g) * scale}


def _plus(a: dict, b: dict, f: float = 1.0) -> dict:
    return {k: a[k] + f * b[k] for k in a}


def test_clip_update_bounds_the_change_and_leaves_a_small_one_alone():
    start = _state(0)
    big = _plus(start, _state(1, 3.0))
    assert update_norm(big, start) > 10
    clipped = clip_update(big, start, 2.0)
    assert update_norm(clipped, start) == pytest.approx(2.0, rel=1e-5)
    # the direction is kept: the clipped change is a positive multiple of the original one
    d0 = torch.cat([(big[k] - start[k]).flatten() for k in big])
    d1 = torch.cat([(clipped[k] - start[k]).flatten() for k in big])
    assert torch.nn.functional.cosine_similarity(d0, d1, dim=0) > 0.99999
    small = _plus(start, _state(2, 1e-3))
    kept = clip_update(small, start, 2.0)
    assert all(torch.allclose(kept[k], small[k], atol=1e-7) for k in small)


def test_server_clipping_averages_clipped_changes_uniformly_before_noise():
    """With negligible noise the new global is the reference plus the *uniform* mean of the
    clipped changes, whatever the sites' example counts."""
    ref = _state(0)
    updates = [_plus(ref, _state(i, s)) for i, s in ((1, 5.0), (2, 0.001), (3, 2.0))]
    agg = Aggregator(FederationSettings(), _privacy("server-clipping", z=1e-9, c=1.5))
    new = agg(1, updates, [1000.0, 1.0, 10.0], ref, population=5)
    for k in ref:
        expected = ref[k] + sum(clip_update(u, ref, 1.5)[k] - ref[k] for u in updates) / 3
        assert torch.allclose(new[k], expected, atol=1e-5), k
    # an unclipped example-weighted mean would be dominated by the first site
    plain = Aggregator(FederationSettings())(1, updates, [1000.0, 1.0, 10.0], ref)
    assert not torch.allclose(plain["w"], new["w"], atol=1e-2)
    assert agg.client_dp.releases[-1].sites == 3 and agg.client_dp.population == 5


def test_the_noise_is_z_times_c_over_the_sites_aggregated():
    ref = {"w": torch.zeros(400, 500)}
    z, c, m = 1.3, 2.0, 4
    agg = Aggregator(FederationSettings(), _privacy("server-clipping", z=z, c=c))
    new = agg(1, [{"w": torch.zeros(400, 500)} for _ in range(m)], [1.0] * m, ref)
    std = float(new["w"].std())
    assert std == pytest.approx(z * c / m, rel=0.02)
    assert abs(float(new["w"].mean())) < 0.01


def test_site_clipping_rejects_an_update_beyond_the_norm_and_takes_a_clipped_one():
    ref = _state(0)
    raw = _plus(ref, _state(1, 2.0))
    agg = Aggregator(FederationSettings(), _privacy("site-clipping", c=1.0))
    reason = agg.check(raw, ref)
    assert reason is not None and "above the round's clipping norm" in reason
    assert agg.check(clip_update(raw, ref, 1.0), ref) is None
    # server-clipping and no DP do not refuse it: they clip it (or do not need to)
    assert Aggregator(FederationSettings(), _privacy("server-clipping")).check(raw, ref) is None
    assert Aggregator(FederationSettings()).check(raw, ref) is None


def test_site_clipping_adds_noise_without_clipping_again():
    ref = {"w": torch.zeros(300, 300)}
    change = torch.full((300, 300), 0.5 / 300)  # norm 0.5, under C = 1
    agg = Aggregator(FederationSettings(), _privacy("site-clipping", z=1e-9, c=1.0))
    new = agg(1, [{"w": ref["w"] + change}, {"w": ref["w"] - change}], [1.0, 1.0], ref)
    assert float(new["w"].abs().max()) < 1e-6  # (+c − c)/2, and no real noise at z ~ 0
    noisy = Aggregator(FederationSettings(), _privacy("site-clipping", z=2.0, c=1.0))
    out = noisy(1, [{"w": ref["w"] + change}, {"w": ref["w"] + change}], [1.0, 1.0], ref)
    assert float((out["w"] - change).std()) == pytest.approx(2.0 * 1.0 / 2, rel=0.03)


def test_the_account_is_flowers_rdp_and_matches_opacus_for_the_gaussian_mechanism():
    from opacus.accountants import RDPAccountant

    dp = ClientDP(_privacy("server-clipping", z=1.1, delta=1e-5),
                  Aggregator(FederationSettings()).strategy)
    assert dp.spent()["epsilon"] == 0.0 and dp.spent()["releases"] == 0
    eps = []
    for rnd in range(1, 6):
        ref = _state(0)
        dp.aggregate(rnd, _replies([_plus(ref, _state(rnd, 0.1)) for _ in range(3)]),
                     {k: v.numpy() for k, v in ref.items()}, population=3)
        eps.append(dp.spent()["epsilon"])
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))  # it composes
    opacus = RDPAccountant()
    for _ in range(5):  # no amplification: every release is a full Gaussian mechanism
        opacus.step(noise_multiplier=1.1, sample_rate=1.0)
    reference = opacus.get_epsilon(delta=1e-5)
    # two RDP implementations (their orders grids differ): the same figure within 2 %
    assert eps[-1] == pytest.approx(reference, rel=0.02)
    # and a different noise gives a different figure: the test can fail
    assert not math.isclose(eps[-1], _eps_for(2.0, 5), rel_tol=0.02)


def _eps_for(z: float, releases: int) -> float:
    dp = ClientDP(_privacy("server-clipping", z=z), Aggregator(FederationSettings()).strategy)
    dp.population = 3
    dp.releases = [Release(z, 3)] * releases
    return dp.spent()["epsilon"]


def _replies(updates):
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from server.aggregation import _Accepted

    return [_Accepted(RecordDict({"arrays": ArrayRecord(dict(u)),
                                  "metrics": MetricRecord({"num-examples": 1.0})}))
            for u in updates]


def test_a_resumed_account_continues_and_a_broken_one_is_refused():
    strategy = Aggregator(FederationSettings()).strategy
    a = ClientDP(_privacy("site-clipping", z=0.9), strategy)
    a.releases, a.population = [Release(0.9, 2), Release(0.9, 3)], 3
    b = ClientDP(_privacy("site-clipping", z=0.9), strategy)
    b.load_state_dict(a.state_dict())
    assert b.spent() == a.spent() and b.spent()["epsilon"] > 0
    for bad in ({}, {"population": 3, "releases": [[0.0, 2]]},
                {"population": 1, "releases": [[0.9, 2]]},
                {"population": "x", "releases": []}):
        with pytest.raises(ValueError):
            b.load_state_dict(bad)


def test_client_dp_settings_are_checked_up_front():
    with pytest.raises(ConfigError, match="client-dp needs aggregation"):
        RunConfig().with_values(client_dp="server-clipping", aggregation="median")
    with pytest.raises(ConfigError, match="transfer-dtype = float32"):
        RunConfig().with_values(client_dp="site-clipping", transfer_dtype="float16")
    with pytest.raises(ConfigError, match="client-dp-noise-multiplier"):
        RunConfig().with_values(client_dp="site-clipping", client_dp_noise_multiplier=0)
    with pytest.raises(ConfigError, match="client-dp"):
        RunConfig().with_values(client_dp="local")
    ok = RunConfig().with_values(client_dp="site-clipping", aggregation="fedprox")
    assert ok.privacy.client_dp == "site-clipping"


def test_the_results_privacy_section_holds_only_what_was_reported():
    rounds = [{"round": 1, "sites": {"7": {"site_name": "a", "metrics": {"dp-epsilon": 0.4}},
                                     "8": {"site_name": "b", "metrics": {}}},
               "client_dp": {"epsilon": 1.5, "delta": 1e-5, "releases": 1,
                             "mechanism": "gaussian, site-clipping", "noise-multiplier": 1.0,
                             "clipping-norm": 1.0, "accountant": "flower rdp", "unit": "site"}},
              {"round": 2, "sites": {"7": {"site_name": "a", "metrics": {"dp-epsilon": 0.7}}}}]
    p = privacy_summary(rounds)
    assert p["client-level"]["epsilon"] == 1.5
    assert p["sample-level"]["sites"] == {"a": {"epsilon": 0.7, "round": 2}}  # b reported none
    text = "\n".join(privacy_lines(p))
    assert "(1.500, 1e-05)-DP" in text and "| a |" in text
    assert privacy_summary([{"round": 1, "sites": {"7": {"site_name": "a", "metrics": {}}}}]) \
        is None
    assert np.isfinite(p["client-level"]["epsilon"])


def test_a_site_clips_its_own_update_under_site_clipping(tmp_path):
    """The same site round without and with ``site-clipping``: the plain update is far beyond
    a small C, the clipped one is within it, in the same direction."""
    from client import site_round
    from moma_protocol import wire
    from tests.helpers import tiny_run
    from tests.test_protocol import _wire

    start = _wire()
    node = {"data-path": "synthetic:target", "cache-dir": str(tmp_path / "c"), "n": 32,
            "device": "cpu", "site-name": "a"}
    fields = site_round.RoundFields(teacher_sha="", server_round=1, score_incoming=False)
    sent = {}
    for mode in ("off", "site-clipping"):
        run = tiny_run(objective="ce", lr=0.05, client_dp=mode, client_dp_clipping_norm=0.05)
        blob, _, _ = site_round.train(node, run.to_flat(), fields, None, wire.encode_blob(start))
        sent[mode] = wire.decode_state(blob)
    plain, clipped = sent["off"], sent["site-clipping"]
    assert update_norm(plain, start) > 0.5
    assert update_norm(clipped, start) == pytest.approx(0.05, rel=1e-3)
    d0 = torch.cat([(plain[k] - start[k]).flatten() for k in start])
    d1 = torch.cat([(clipped[k] - start[k]).flatten() for k in start])
    assert torch.nn.functional.cosine_similarity(d0, d1, dim=0) > 0.999
    # the site's own ledger holds the client-level round (and nothing for the run without)
    from moma_core.privacy.accounting import DPStep, epsilon
    from moma_core.privacy.ledger import PrivacyLedger

    entries = PrivacyLedger(tmp_path / "c").entries()
    assert [(e.mechanism, e.unit, e.round, e.noise_multiplier, e.sample_rate) for e in entries] \
        == [("client-dp", "site", 1, 1.0, 1.0)]
    assert entries[0].epsilon == pytest.approx(epsilon([DPStep(1.0, 1.0, 1)], 1e-5, "rdp"))


def test_the_noise_is_not_predicted_by_a_seed_set_before():
    """Flower draws from numpy's global generator; a run seeds generators with its (public)
    seed. Seeding numpy the same way before two releases must not give the same noise."""
    ref = {"w": torch.zeros(50, 50)}
    draws = []
    for _ in range(2):
        np.random.seed(0)
        agg = Aggregator(FederationSettings(), _privacy("server-clipping", z=1.0, c=1.0))
        draws.append(agg(1, [{"w": torch.zeros(50, 50)}] * 2, [1.0, 1.0], ref)["w"])
    assert not torch.equal(draws[0], draws[1])


def test_a_site_caps_its_site_level_epsilon_under_client_dp(tmp_path):
    """The site's max-client-epsilon wins: a round whose release would take the site past it
    is refused by category before anything trains or is recorded; under the cap it trains."""
    from client import site_round
    from client.site_errors import PrivacyBudgetExceeded, error_category
    from moma_core.privacy.ledger import PrivacyLedger
    from moma_protocol import wire
    from tests.helpers import tiny_run
    from tests.test_protocol import _wire

    run = tiny_run(objective="ce", client_dp="site-clipping").to_flat()
    fields = site_round.RoundFields(teacher_sha="", server_round=1, score_incoming=False)
    node = {"data-path": "synthetic:target", "cache-dir": str(tmp_path / "c"), "n": 32,
            "device": "cpu", "site-name": "a", "max-client-epsilon": 0.5}
    with pytest.raises(PrivacyBudgetExceeded) as err:
        site_round.train(node, run, fields, None, wire.encode_blob(_wire()))
    assert error_category(err.value) == "privacy-budget" and str(err.value) == "would-exceed"
    assert PrivacyLedger(tmp_path / "c").entries() == []
    node["max-client-epsilon"] = 100.0
    site_round.train(node, run, fields, None, wire.encode_blob(_wire()))
    assert [e.unit for e in PrivacyLedger(tmp_path / "c").entries()] == ["site"]


def test_a_resume_without_the_saved_account_is_refused():
    """The coordinator's resume: the client-level account must come back with the run (it
    would otherwise restart at ε = 0 and under-count every earlier release)."""
    agg = Aggregator(FederationSettings(), _privacy("site-clipping", z=0.9))
    with pytest.raises(ValueError, match="no privacy account"):
        agg.restore_client_dp({"rng": []})
    with pytest.raises(ValueError, match="unreadable"):
        agg.restore_client_dp({"client_dp": {"releases": "x"}})
    agg.restore_client_dp({"client_dp": {"population": 3, "releases": [[0.9, 2], [0.9, 3]]}})
    assert len(agg.client_dp.releases) == 2 and agg.client_dp.spent()["epsilon"] > 0
    Aggregator(FederationSettings()).restore_client_dp({})  # no client-dp: nothing to restore


# -- adaptive clipping (Andrew et al. 2021) -------------------------------------------------
def _adaptive(mode: str, z: float, c: float, sigma_b: float, lr: float = 0.2,
              quantile: float = 0.5) -> PrivacySettings:
    return PrivacySettings(client_dp=mode, client_dp_noise_multiplier=z,
                           client_dp_clipping_norm=c, client_dp_clipping="adaptive",
                           client_dp_count_stddev=sigma_b, client_dp_clip_lr=lr,
                           client_dp_target_quantile=quantile)


@pytest.mark.parametrize("mode", ["server-clipping", "site-clipping"])
def test_adaptive_clipping_moves_the_norm_toward_the_target_quantile(mode):
    """All updates within the norm: it shrinks by exp(-lr (1 - q)); all beyond: it grows by
    exp(lr q) (negligible count noise)."""
    ref = _state(0)
    small = [_plus(ref, _state(i, 1e-4)) for i in range(1, 4)]
    big = [clip_update(_plus(ref, _state(i, 5.0)), ref, 2.0) if mode == "site-clipping"
           else _plus(ref, _state(i, 5.0)) for i in range(1, 4)]
    agg = Aggregator(FederationSettings(min_train_nodes=3),
                     _adaptive(mode, z=1e-9, c=2.0, sigma_b=1e-6))
    dp = agg.client_dp
    agg(1, small, [1.0] * 3, ref)
    assert dp.releases[-1].clipping_norm == 2.0
    assert dp.clipping_norm == pytest.approx(2.0 * math.exp(-0.2 * 0.5), rel=1e-5)
    c1 = dp.clipping_norm
    big = [clip_update(u, ref, c1) for u in big] if mode == "site-clipping" else big
    agg(2, big, [1.0] * 3, ref)
    assert dp.releases[-1].clipping_norm == pytest.approx(c1)
    assert dp.clipping_norm == pytest.approx(c1 * math.exp(0.2 * 0.5), rel=1e-5)
    # the account is one Gaussian release of the run's z per round, whatever the norm did
    assert [r.noise_multiplier for r in dp.releases] == [1e-9, 1e-9]


def test_adaptive_noise_is_scaled_by_the_norm_the_updates_were_clipped_to():
    """The update noise is z_Δ·C_t/m with C_t this round's norm, not the next round's (Flower's
    adaptive wrappers scale it by the moved norm, which under-noises a shrinking norm)."""
    ref = {"w": torch.zeros(400, 500)}
    z, c, m, sigma_b = 1.3, 2.0, 40, 1.0  # 40 sites: the count's noise moves b̃ by ~0.025
    agg = Aggregator(FederationSettings(min_train_nodes=m),
                     _adaptive("server-clipping", z, c, sigma_b, lr=2.0))
    new = agg(1, [{"w": torch.zeros(400, 500)} for _ in range(m)], [1.0] * m, ref)
    z_update = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5
    assert agg.client_dp.update_noise_multiplier == pytest.approx(z_update)
    assert float(new["w"].std()) == pytest.approx(z_update * c / m, rel=0.02)
    assert agg.client_dp.clipping_norm < 0.7 * c  # every update was within: the norm shrank


def test_adaptive_settings_are_checked_and_the_count_noise_has_a_usable_default():
    with pytest.raises(ConfigError, match="client-dp-count-stddev"):
        RunConfig().with_values(client_dp="server-clipping", client_dp_clipping="adaptive",
                                client_dp_noise_multiplier=1.0, client_dp_count_stddev=0.4)
    with pytest.raises(ConfigError, match="client-dp-clipping"):
        RunConfig().with_values(client_dp="server-clipping", client_dp_clipping="quantile")
    with pytest.raises(ConfigError, match="client-dp-target-quantile"):
        RunConfig().with_values(client_dp_target_quantile=1.5)
    run = RunConfig().with_values(client_dp="site-clipping", client_dp_clipping="adaptive",
                                  client_dp_noise_multiplier=0.8, min_train_nodes=2)
    assert run.privacy.count_stddev(2) == 0.8  # two sites: 2/20 would leave no update noise
    assert run.privacy.count_stddev(100) == 5.0  # Andrew et al.'s sites/20
    dp = ClientDP(run.privacy, Aggregator(FederationSettings()).strategy, 2)
    assert dp.update_noise_multiplier == pytest.approx(0.8 * (4 / 3) ** 0.5)


def test_site_clipping_sends_the_rounds_norm_and_the_site_clips_to_it(tmp_path):
    """Under site-clipping the train message names this round's norm; the site clips to it
    (not to the run's starting norm); a message with a broken norm is refused."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from client import site_round
    from client.site_errors import ConfigError as SiteConfigError
    from client.site_messages import round_fields as _round_fields
    from moma_protocol import wire
    from tests.helpers import tiny_run
    from tests.test_protocol import _wire, instruction

    agg = Aggregator(FederationSettings(), _adaptive("site-clipping", 0.5, 1.0, 1.0))
    assert agg.client_dp.round_norm() == 1.0
    agg.client_dp.clipping_norm = 0.02
    assert agg.client_dp.round_norm() == 0.02
    assert Aggregator(FederationSettings(),
                      _adaptive("server-clipping", 0.5, 1.0, 1.0)).client_dp.round_norm() is None

    def message(norm):
        config = {wire.SERVER_ROUND: 1, wire.TEACHER_SHA: "", wire.EVALUATE_FLAG: False}
        if norm is not None:
            config[wire.CLIPPING_NORM] = norm
        return instruction(wire.TRAIN, RecordDict({wire.ARRAYS: ArrayRecord(),
                                                   wire.CONFIG: ConfigRecord(config)}))

    assert _round_fields(message(None)).clipping_norm == 0.0
    fields = _round_fields(message(0.02))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(SiteConfigError):
            _round_fields(message(bad))
    start = _wire()
    node = {"data-path": "synthetic:target", "cache-dir": str(tmp_path / "c"), "n": 32,
            "device": "cpu", "site-name": "a"}
    run = tiny_run(objective="ce", lr=0.05, client_dp="site-clipping",
                   client_dp_clipping="adaptive", client_dp_clipping_norm=1.0,
                   client_dp_noise_multiplier=0.5, client_dp_count_stddev=1.0)
    blob, _, _ = site_round.train(node, run.to_flat(), fields, None, wire.encode_blob(start))
    assert update_norm(wire.decode_state(blob), start) == pytest.approx(0.02, rel=1e-3)


def test_a_resumed_adaptive_run_continues_from_the_adapted_norm():
    strategy = Aggregator(FederationSettings()).strategy
    a = ClientDP(_adaptive("server-clipping", 0.5, 1.0, 1.0), strategy)
    a.releases, a.population, a.clipping_norm = [Release(0.5, 2, 1.0)], 2, 0.37
    b = ClientDP(_adaptive("server-clipping", 0.5, 1.0, 1.0), strategy)
    b.load_state_dict(a.state_dict())
    assert b.clipping_norm == 0.37 and b.spent() == a.spent()
    assert b.spent()["next-clipping-norm"] == 0.37 and b.spent()["clipping-norm"] == 1.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="clipping norm"):
            b.load_state_dict({**a.state_dict(), "clipping-norm": bad})
    # an account saved before the norm was recorded still loads (a fixed norm)
    c = ClientDP(_privacy("server-clipping", z=0.5), strategy)
    c.load_state_dict({"population": 2, "releases": [[0.5, 2]]})
    assert c.releases == [Release(0.5, 2, 0.0)] and c.clipping_norm == 1.0


def test_the_report_names_adaptive_clipping():
    strategy = Aggregator(FederationSettings()).strategy
    dp = ClientDP(_adaptive("server-clipping", 0.5, 1.0, 1.0), strategy, 2)
    dp.releases, dp.population, dp.clipping_norm = [Release(0.5, 2, 1.0)], 2, 0.8
    text = "\n".join(privacy_lines({"client-level": dp.spent()}))
    assert "adaptive clipping (last norm 1, next 0.8" in text
    assert "count noise std 1" in text


def test_the_adaptive_round_is_one_gaussian_mechanism_of_z_on_neighbouring_federations(
        monkeypatch):
    """Neighbouring federations (one site added or removed, its update within the norm or
    not): the count statistic the norm is moved by changes by at most ½ in the units the noise
    split assumes (σ_b for ½, Flower's (2σ_b)⁻²), so the round's multiplier is z. A 0/1 count
    over the actual number of sites moves by up to 1 (or 1/m of a changed denominator) and
    under-states ε."""
    z, sigma_b, lr, M = 1.0, 1.0, 0.5, 4
    dp = ClientDP(_adaptive("server-clipping", z, 1.0, sigma_b, lr=lr),
                  Aggregator(FederationSettings()).strategy, M)
    # the pair (update sum, count) moved by (C, ½) is, in units of its noise, 1/z away
    assert ((1 / dp.update_noise_multiplier) ** 2 + (0.5 / dp.count_stddev) ** 2) ** -0.5 == \
        pytest.approx(z)
    monkeypatch.setattr(np.random, "normal", lambda mean, std: mean)  # the statistic itself

    def step(within: int, sites: int) -> float:
        dp.clipping_norm = 1.0
        dp.adapt(within, sites)
        return math.log(dp.clipping_norm) / -lr + dp.target_quantile  # the fraction used

    worst = 0.0
    for sites in range(1, 7):
        for within in range(sites + 1):
            here = step(within, sites)
            neighbours = [(within, sites + 1), (within + 1, sites + 1)]
            neighbours += [(w, sites - 1) for w in (within - 1, within)
                           if sites > 1 and 0 <= w <= sites - 1]
            for w, m in neighbours:
                worst = max(worst, abs(step(w, m) - here))
                assert abs(centred_count(w, m) - centred_count(within, sites)) == 0.5
    # the fraction moves by the count's ½ over the fixed denominator M, never more
    assert worst == pytest.approx(0.5 / M)
