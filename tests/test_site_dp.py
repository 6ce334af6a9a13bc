"""DP-SGD at a site: the run's settings, the site's policy (which wins) and its ledger."""

import math
from dataclasses import replace

import pytest
import torch

from client.site_config import site_settings
from client.site_errors import PrivacyBudgetExceeded, PrivacyRefused, error_category
from client.site_training import train_round
from moma_core.models import build_model
from moma_core.privacy.accounting import DPStep, epsilon
from moma_core.privacy.ledger import PrivacyLedger
from moma_protocol.settings import ConfigError
from moma_protocol.wire import DP_EPSILON, TRAIN_METRICS, wire_state
from tests.helpers import site_with_teacher, synthetic_sites, tiny_run


def _dp_run(**overrides):
    values = dict(objective="dp-moma", dp="dp-sgd", dp_noise_multiplier=1.1,
                  dp_max_grad_norm=1.0, dp_public_images=32, run_name="dp",
                  dp_trainable="all", dp_optimizer="adamw", dp_lr=0.003)
    values.update(overrides)
    return tiny_run(**values)


@pytest.fixture
def site(tmp_path):
    return site_with_teacher(tmp_path)


def _global(run):
    torch.manual_seed(0)
    return wire_state(build_model(run.student_architecture()).state_dict())


def test_dp_sgd_settings_are_checked_up_front():
    for objective in ("moma", "crckd"):
        with pytest.raises(ConfigError, match="dp = dp-sgd needs objective"):
            _dp_run(objective=objective)
    with pytest.raises(ConfigError, match="fedprox"):
        _dp_run(aggregation="fedprox")
    with pytest.raises(ConfigError):
        _dp_run(dp_noise_multiplier=0.0)
    run = _dp_run()
    arch = run.student_architecture()
    assert arch.extra == {"norm": "group", "group-size": 16}
    model = build_model(arch)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for m in model.modules())
    assert tiny_run().student_architecture().extra == {}
    # the product's DP defaults (the sweep in docs/benchmarks.md): the classifier on the frozen
    # BatchNorm backbone, SGD at lr 8, clipping norm 0.1
    default = tiny_run(dp="dp-sgd", objective="ce")
    assert default.student_architecture().extra == {}
    cfg = default.train_config(1)
    assert (default.privacy.dp_trainable, cfg.optimizer, cfg.lr,
            default.privacy.dp_max_grad_norm) == ("head", "sgd", 8.0, 0.1)
    assert tiny_run().train_config(1).lr == 0.003  # without DP: the run's own lr


def test_a_dp_round_records_the_ledger_before_it_reports_epsilon(site):
    settings, sha = site
    run = _dp_run()
    start = _global(run)
    assert not any("running_mean" in k for k in start)  # GroupNorm: no batch statistics
    state, n, metrics = train_round(settings, run, 1, start, sha)
    assert set(state) == set(start) and n > 0 and set(metrics) <= TRAIN_METRICS  # Poisson batches
    entries = PrivacyLedger(settings.cache_dir).entries()
    assert [(e.run, e.round, e.unit, e.mechanism) for e in entries] == [
        ("dp", 1, "patch", "dp-sgd")]
    e = entries[0]
    assert e.noise_multiplier == 1.1 and e.steps == metrics["train-steps"] == 3
    assert e.delta == pytest.approx(1 / (10 * 48))
    assert metrics[DP_EPSILON] == pytest.approx(
        epsilon([DPStep(1.1, e.sample_rate, 3)], e.delta), abs=1e-9)
    # a second round (and a second run) compose: the budget is never reset
    _, _, again = train_round(settings, run, 2, state, sha)
    other_run = replace(run, federation=replace(run.federation, run_name="dp-2"))
    _, _, third = train_round(settings, other_run, 1, state, sha)
    assert metrics[DP_EPSILON] < again[DP_EPSILON] < third[DP_EPSILON]
    assert len(PrivacyLedger(settings.cache_dir).entries()) == 3


def test_the_site_policy_wins(site, tmp_path):
    settings, sha = site
    # a site that requires DP refuses a run without it
    strict = replace(settings, require_dp=True)
    with pytest.raises(PrivacyRefused) as err:
        train_round(strict, tiny_run(), 1, _global(tiny_run()), sha)
    assert error_category(err.value) == "privacy-refused"
    # a site that requires client-level DP refuses a run without it, takes one with it
    wants_client_dp = replace(settings, require_client_dp=True)
    with pytest.raises(PrivacyRefused, match="require-client-dp") as err:
        train_round(wants_client_dp, tiny_run(), 1, _global(tiny_run()), sha)
    assert error_category(err.value) == "privacy-refused"
    assert PrivacyLedger(settings.cache_dir).entries() == []
    with_client_dp = tiny_run(client_dp="server-clipping")
    train_round(wants_client_dp, with_client_dp, 1, _global(with_client_dp), sha)
    assert [e.mechanism for e in PrivacyLedger(settings.cache_dir).entries()] == ["client-dp"]
    # (a fresh ledger on purpose: the ledger and its head file both gone; either alone is
    # refused, tests/test_ledger_chain.py)
    for name in ("ledger.json", "ledger.json.head"):
        (settings.cache_dir / "privacy" / name).unlink()
    # a budget the round would exceed: refused, nothing trained, nothing recorded
    run = _dp_run()
    capped = replace(settings, max_epsilon=0.01)
    with pytest.raises(PrivacyBudgetExceeded) as err:
        train_round(capped, run, 1, _global(run), sha)
    assert error_category(err.value) == "privacy-budget" and str(err.value) == "would-exceed"
    assert PrivacyLedger(settings.cache_dir).entries() == []
    # a damaged ledger stops DP training instead of restarting the budget at zero
    ledger = settings.cache_dir / "privacy" / "ledger.json"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text("{not json")
    from moma_core.privacy.ledger import LedgerError

    with pytest.raises(LedgerError) as err:
        train_round(settings, run, 1, _global(run), sha)
    assert error_category(err.value) == "privacy-refused"



def test_a_run_delta_above_the_sites_ceiling_is_refused_before_anything_is_spent(site):
    """ε is reported at the run's δ: a coordinator that raises δ makes the same noise look
    cheaper. By default a site accepts at most 1/(10·n); its own max-delta can allow more."""
    settings, sha = site
    loose = _dp_run().with_values(dp_delta=1e-3)
    for policy in (replace(settings, max_delta=1e-4),  # the site's own ceiling
                   replace(settings, n=400)):  # the default, 1/(10·n) < 1e-3 for n = 400
        with pytest.raises(PrivacyRefused, match="above this site's ceiling") as err:
            train_round(policy, loose, 1, _global(loose), sha)
        assert error_category(err.value) == "privacy-refused"
        assert PrivacyLedger(settings.cache_dir).entries() == []  # nothing spent
    allowed = replace(settings, max_delta=1e-3)
    state, _, metrics = train_round(allowed, loose, 1, _global(loose), sha)
    assert metrics["dp-epsilon"] > 0
    assert [e.delta for e in PrivacyLedger(settings.cache_dir).entries()] == [1e-3]


def test_site_policy_comes_from_the_node_config(tmp_path):
    from client.site_config import SiteConfigError

    node = {**synthetic_sites(tmp_path, 1)[0], "require-dp": "true", "max-epsilon": 3.5}
    s = site_settings(node)
    assert s.require_dp and s.max_epsilon == 3.5 and not s.require_client_dp
    assert site_settings({**node, "require-client-dp": "true"}).require_client_dp
    for bad in ("-1", "nan", "inf", "lots"):
        with pytest.raises(SiteConfigError, match="max-epsilon"):
            site_settings({**node, "max-epsilon": bad})
    assert site_settings({**node, "max-client-epsilon": "2"}).max_client_epsilon == 2.0
    for bad in ("-1", "nan", "inf", "lots"):
        with pytest.raises(SiteConfigError, match="max-client-epsilon"):
            site_settings({**node, "max-client-epsilon": bad})
    assert site_settings({**node, "max-delta": "1e-4"}).max_delta == 1e-4
    for bad in ("-1", "nan", "1", "lots"):
        with pytest.raises(SiteConfigError, match="max-delta"):
            site_settings({**node, "max-delta": bad})


def test_the_site_policy_flags_reach_the_node_config(tmp_path):
    """``moma-client``'s policy flags become the node config the site's ClientApp reads."""
    from flwr.common.config import parse_config_args

    from client.cli import node_config, parser, resolve

    args = resolve(parser().parse_args([
        "--insecure", "--server", "127.0.0.1:1", "--data", "synthetic:target",
        "--cache-dir", str(tmp_path), "--require-dp", "--require-client-dp",
        "--max-epsilon", "4", "--max-client-epsilon", "9", "--max-delta", "1e-4",
        "--ledger", str(tmp_path / "state" / "ledger.json")]))
    args.kit_info = None
    s = site_settings(parse_config_args([node_config(args)]))  # as flower-supernode reads it
    assert (s.require_dp, s.require_client_dp) == (True, True)
    assert (s.max_epsilon, s.max_client_epsilon, s.max_delta) == (4.0, 9.0, 1e-4)
    assert s.ledger == tmp_path / "state" / "ledger.json"
    plain = resolve(parser().parse_args([
        "--insecure", "--server", "127.0.0.1:1", "--data", "synthetic:target",
        "--cache-dir", str(tmp_path)]))
    assert 'require-client-dp="false"' in node_config(plain)


def test_a_dp_student_keeps_at_least_16_channels_per_group():
    """The DP student's GroupNorms: ≥ 16 channels per group from the run's architecture; a
    checkpoint's architecture without ``group-size`` keeps the old rule (same state, same
    behaviour)."""
    from moma_core.models import Architecture
    from moma_core.privacy.dp_sgd import group_count

    assert [group_count(c, 16) for c in (16, 24, 32, 48, 64, 256, 1280)] == \
        [1, 1, 2, 3, 4, 16, 32]
    new = build_model(_dp_run().student_architecture())
    old = build_model(Architecture("test_efficientnet", ("a", "b"), 32, extra={"norm": "group"}))
    norms = [m for m in new.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels // m.num_groups >= 16 for m in norms)
    olds = [m for m in old.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [m.num_groups for m in olds] == [math.gcd(32, m.num_channels) for m in olds]


def test_a_site_trains_the_head_privately_and_spends_the_runs_target_epsilon(site):
    """``dp-trainable = head``: the student keeps BatchNorm (the teacher's statistics, frozen)
    and only its classifier moves; ``dp-target-epsilon``: the noise multiplier is derived so
    that the run's planned rounds spend that ε, and the ledger records exactly it."""
    settings, sha = site
    run = _dp_run(objective="ce", dp_trainable="head", dp_target_epsilon=4.0, num_rounds=2,
                  dp_physical_batch=4)
    arch = run.student_architecture()
    assert arch.extra == {}  # BatchNorm kept
    start = _global(run)
    assert any("running_mean" in k for k in start)
    state, _, m1 = train_round(settings, run, 1, start, sha)
    changed = {k for k in start if not torch.equal(start[k], state[k])}
    assert changed == {"classifier.weight", "classifier.bias"}
    _, _, m2 = train_round(settings, run, 2, state, sha)
    entries = PrivacyLedger(settings.cache_dir).entries()
    assert len({e.noise_multiplier for e in entries}) == 1 and entries[0].noise_multiplier < 1.1
    assert m1[DP_EPSILON] < m2[DP_EPSILON] <= 4.0 and m2[DP_EPSILON] == pytest.approx(4.0,
                                                                                       abs=0.05)
    with pytest.raises(PrivacyRefused, match="dp-target-epsilon"):
        train_round(settings, _dp_run(objective="ce", dp_target_epsilon=1e-4, run_name="tiny"),
                    1, start, sha)


def test_a_target_epsilon_without_dp_sgd_is_refused():
    """A run that names the ε to spend but forgets dp = dp-sgd would train without DP."""
    with pytest.raises(ConfigError, match="dp-target-epsilon is the epsilon DP-SGD spends"):
        tiny_run(objective="ce", dp_target_epsilon=8.0)
    assert tiny_run(objective="ce", dp="dp-sgd", dp_target_epsilon=8.0).privacy.dp == "dp-sgd"
