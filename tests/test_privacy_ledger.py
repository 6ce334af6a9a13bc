"""The site's privacy ledger and its ε accounting (sample-level DP-SGD over Opacus)."""

import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from moma_core.privacy import (
    DPStep,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    default_delta,
    epsilon,
    noise_for_target_epsilon,
    print_ledger,
)

DELTA = 1e-5


def _stepped_epsilon(history, delta, accountant):
    """ε as Opacus' optimizer hook would leave it: one ``accountant.step`` per optimizer step."""
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for stretch in history:
        for _ in range(stretch.steps):
            acc.step(noise_multiplier=stretch.noise_multiplier, sample_rate=stretch.sample_rate)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("accountant,scale", [("rdp", 10), ("prv", 1)])
def test_epsilon_matches_opacus_driven_step_by_step(accountant, scale):
    # Two runs with different noise and sample rate; run 1 had two rounds with equal settings.
    history = [DPStep(1.1, 0.05, 10 * scale), DPStep(1.1, 0.05, 10 * scale),
               DPStep(0.8, 0.1, 15 * scale)]
    expected = _stepped_epsilon(history, DELTA, accountant)
    got = epsilon(history, DELTA, accountant)
    assert got == pytest.approx(expected, abs=1e-6) and got > 0
    if accountant == "rdp":  # (PRV is slow: check these once)
        assert got > epsilon(history[:2], DELTA, accountant) > 0
        # Zero-step stretches change nothing.
        assert epsilon([*history, DPStep(0.5, 0.5, 0)], DELTA, accountant) == got


def test_epsilon_inputs():
    assert epsilon([], DELTA) == 0.0
    assert epsilon([DPStep(1.0, 0.1, 0)], DELTA, "prv") == 0.0
    history = [DPStep(1.0, 0.01, 10)]
    with pytest.raises(ValueError, match="accountant"):
        epsilon(history, DELTA, "gdp")
    for delta in (0, 1, -1e-5, math.nan):
        with pytest.raises(ValueError, match="delta"):
            epsilon(history, delta)
    with pytest.raises(ValueError, match="DPStep"):
        epsilon([(1.0, 0.01, 10)], DELTA)
    for bad in [dict(sample_rate=0), dict(sample_rate=1.5), dict(noise_multiplier=0),
                dict(noise_multiplier=-1.0), dict(noise_multiplier=math.inf),
                dict(steps=-1), dict(steps=1.5), dict(steps=True)]:
        with pytest.raises(ValueError):
            DPStep(**{"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, **bad})
    assert DPStep(1, 1, 3).noise_multiplier == 1.0  # sample rate 1 allowed, ints as floats


def test_default_delta():
    assert default_delta(1000) == pytest.approx(1e-4)
    assert default_delta(1) == pytest.approx(0.1)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError):
            default_delta(bad)


def test_noise_for_target_epsilon_lands_just_under_target():
    target, rate, steps = 2.0, 0.01, 500
    sigma = noise_for_target_epsilon(target, DELTA, rate, steps)
    assert epsilon([DPStep(sigma, rate, steps)], DELTA) <= target
    assert epsilon([DPStep(0.9 * sigma, rate, steps)], DELTA) > target

    already = [DPStep(1.5, 0.01, 300)]
    assert 0 < epsilon(already, DELTA) < target
    sigma2 = noise_for_target_epsilon(target, DELTA, rate, steps, already=already)
    assert sigma2 > sigma  # what was spent before leaves less room
    assert epsilon([*already, DPStep(sigma2, rate, steps)], DELTA) <= target
    assert epsilon([*already, DPStep(0.9 * sigma2, rate, steps)], DELTA) > target

    with pytest.raises(ValueError, match="already"):
        noise_for_target_epsilon(epsilon(already, DELTA), DELTA, rate, steps, already=already)
    with pytest.raises(ValueError):
        noise_for_target_epsilon(target, DELTA, rate, 0)
    with pytest.raises(ValueError):
        noise_for_target_epsilon(target, DELTA, 0.0, steps)


def test_ledger_round_trip_and_composition_across_runs(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    assert ledger.entries() == [] and ledger.spent("patch", DELTA, "rdp") == 0.0
    s1, s2, s3 = DPStep(1.1, 0.01, 200), DPStep(1.1, 0.01, 200), DPStep(0.9, 0.02, 100)
    e1 = ledger.record("run-a", 1, s1, "patch", DELTA, "rdp")
    e2 = ledger.record("run-a", 2, s2, "patch", DELTA, "rdp")
    e3 = ledger.record("run-b", 1, s3, "patch", DELTA, "rdp")
    other = ledger.record("run-b", 1, DPStep(2.0, 0.1, 10), "patient", 1e-3, "rdp")

    path = tmp_path / "privacy" / "ledger.json"
    stored = json.loads(path.read_text())
    assert stored["version"] == 2 and len(stored["entries"]) == 4
    assert sorted(p.name for p in path.parent.iterdir()) == [
        ".ledger.json.lock", "ledger.json", "ledger.json.head"]
    head = json.loads(ledger.head_path.read_text())
    assert head == {"version": 2, "entries": 4, "last": stored["entries"][-1]["hash"]}

    reloaded = PrivacyLedger(tmp_path).entries()
    assert reloaded == [e1, e2, e3, other]
    assert [e.epsilon for e in reloaded] == [e1.epsilon, e2.epsilon, e3.epsilon, other.epsilon]
    assert (e3.run, e3.round, e3.unit, e3.mechanism, e3.accountant) == (
        "run-b", 1, "patch", "dp-sgd", "rdp")

    # The budget composes over rounds and runs; a patient-level round spends the patch
    # level's budget too (it bounds each patch), patch-level rounds not the patient level's.
    assert e1.epsilon < e2.epsilon < e3.epsilon
    assert e1.epsilon == pytest.approx(epsilon([s1], DELTA), abs=1e-12)
    assert e3.epsilon == pytest.approx(epsilon([s1, s2, s3], DELTA), abs=1e-12)
    assert e3.epsilon == pytest.approx(_stepped_epsilon([s1, s2, s3], DELTA, "rdp"), abs=1e-6)
    assert PrivacyLedger(tmp_path).history("patch") == [s1, s2, s3, other.step]
    assert ledger.history("patient") == [other.step]
    assert ledger.history("patch", mechanism="client-dp") == []
    assert ledger.spent("patch", DELTA, "rdp") == pytest.approx(
        epsilon([s1, s2, s3, other.step], DELTA), abs=1e-12)
    assert other.epsilon == pytest.approx(epsilon([DPStep(2.0, 0.1, 10)], 1e-3), abs=1e-12)
    assert ledger.spent("patient", 1e-3, "rdp") == pytest.approx(other.epsilon, abs=1e-12)


def test_record_rejects_bad_arguments(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    step = DPStep(1.0, 0.01, 10)
    for kwargs in [dict(run=""), dict(run="a\nb"), dict(round=-1), dict(unit="slide"),
                   dict(accountant="gdp"), dict(mechanism="dp"), dict(delta=0.0),
                   dict(step=(1.0, 0.01, 10))]:
        args = {"run": "r", "round": 1, "step": step, "unit": "patch", "delta": DELTA,
                "accountant": "rdp", **kwargs}
        with pytest.raises(ValueError):
            ledger.record(**args)
    assert not ledger.path.exists()


def test_unbounded_epsilon_is_stored_as_null():
    entry = LedgerEntry(run="r", round=0, mechanism="dp-sgd", noise_multiplier=1.0,
                        sample_rate=0.5, steps=3, delta=DELTA, unit="patient",
                        epsilon=math.inf, accountant="rdp", time="2025-01-01T00:00:00+00:00")
    data = json.loads(json.dumps(entry.to_json(), allow_nan=False))
    assert data["epsilon"] is None and LedgerEntry.from_json(data) == entry


def _entry_dict(**changes):
    entry = {"run": "r", "round": 1, "mechanism": "dp-sgd", "noise_multiplier": 1.0,
             "sample_rate": 0.01, "steps": 10, "delta": DELTA, "unit": "patch",
             "epsilon": 0.5, "accountant": "rdp", "time": "2025-01-01T00:00:00+00:00"}
    entry.update(changes)
    return entry


def _ledger_text(*entries, version=1):
    return json.dumps({"version": version, "entries": list(entries)})


def test_well_formed_ledger_file_loads(tmp_path):
    """A version-1 ledger (before the hash chain) loads, upgraded in place once."""
    path = tmp_path / "privacy" / "ledger.json"
    path.parent.mkdir()
    path.write_text(_ledger_text(_entry_dict(), _entry_dict(round=2)))
    assert [e.round for e in PrivacyLedger(tmp_path).entries()] == [1, 2]
    assert json.loads(path.read_text())["version"] == 2
    assert [e.round for e in PrivacyLedger(tmp_path).entries()] == [1, 2]


@pytest.mark.parametrize("text", [
    "", "{not json", "[]", "null", '"ledger"',
    json.dumps({"entries": []}),
    _ledger_text(version=3),
    _ledger_text(version="1"),
    _ledger_text(_entry_dict(), version=2),  # no hash chain
    _ledger_text({**_entry_dict(), "prev": "0" * 64, "hash": "x"}, version=2),
    json.dumps({"version": 2, "moved-to": "/elsewhere/ledger.json"}),
    json.dumps({"version": 1, "entries": {}}),
    json.dumps({"version": 1, "entries": [], "extra": 0}),
    '{"version": 1, "version": 1, "entries": []}',
    _ledger_text(["r", 1]),
    _ledger_text(_entry_dict(steps=-1)),
    _ledger_text(_entry_dict(sample_rate=2)),
    _ledger_text(_entry_dict(sample_rate=0)),
    _ledger_text(_entry_dict(noise_multiplier=0)),
    _ledger_text(_entry_dict(steps=2.5)),
    _ledger_text(_entry_dict(delta=1.5)),
    _ledger_text(_entry_dict(epsilon=-0.1)),
    _ledger_text(_entry_dict(unit="slide")),
    _ledger_text(_entry_dict(mechanism="none")),
    _ledger_text(_entry_dict(accountant="gdp")),
    _ledger_text(_entry_dict(round=True)),
    _ledger_text(_entry_dict(run="")),
    _ledger_text(_entry_dict(time="yesterday")),
    _ledger_text(_entry_dict(time="2025-01-01T00:00:00")),
    _ledger_text(_entry_dict(image="/data/slide1.svs")),
    _ledger_text({k: v for k, v in _entry_dict().items() if k != "delta"}),
    _ledger_text(_entry_dict()).replace("0.5", "NaN"),
], ids=lambda t: t[:40] or "empty")
def test_untrustworthy_ledger_raises(tmp_path, text):
    path = tmp_path / "privacy" / "ledger.json"
    path.parent.mkdir()
    path.write_text(text)
    ledger = PrivacyLedger(tmp_path)
    step = DPStep(1.0, 0.01, 10)
    with pytest.raises(LedgerError):
        ledger.entries()
    with pytest.raises(LedgerError):
        ledger.spent("patch", DELTA, "rdp")
    with pytest.raises(LedgerError):
        ledger.plan(10.0, step, "patch", DELTA, "rdp")
    with pytest.raises(LedgerError):
        ledger.record("r", 2, step, "patch", DELTA, "rdp")
    assert path.read_text() == text  # never overwritten, never reset


def test_unreadable_ledger_raises(tmp_path):
    (tmp_path / "privacy" / "ledger.json").mkdir(parents=True)  # a folder, not a file
    with pytest.raises(LedgerError):
        PrivacyLedger(tmp_path).entries()
    (tmp_path / "other" / "privacy").mkdir(parents=True)
    (tmp_path / "other" / "privacy" / "ledger.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(LedgerError):
        PrivacyLedger(tmp_path / "other").entries()


def test_plan_against_the_cap(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    step = DPStep(1.0, 0.02, 100)
    fresh = ledger.plan(1e-3, step, "patch", DELTA, "rdp")
    assert (fresh.status, fresh.allowed, fresh.epsilon_now) == ("would-exceed", False, 0.0)

    ledger.record("run-a", 1, DPStep(1.0, 0.02, 300), "patch", DELTA, "rdp")
    now = ledger.spent("patch", DELTA, "rdp")
    after = epsilon([*ledger.history("patch"), step], DELTA)
    assert 0 < now < after

    def check(eps_max):
        result = ledger.plan(eps_max, step, "patch", DELTA, "rdp")
        assert result.epsilon_now == pytest.approx(now, abs=1e-12)
        assert result.epsilon_after == pytest.approx(after, abs=1e-12)
        assert result.allowed == (result.status == "ok")
        return result.status

    assert check(None) == "ok"
    assert check(after + 0.01) == "ok"
    assert check(after) == "ok"
    assert check((now + after) / 2) == "would-exceed"
    assert check(now) == "budget-exhausted"
    assert check(now / 2) == "budget-exhausted"
    # A patient-level round spends the patch level's budget too: refused at this cap (the
    # audit's case); client-level DP is a budget of its own.
    assert epsilon([step], DELTA) < now
    assert ledger.plan(now, step, "patient", DELTA, "rdp").status == "budget-exhausted"
    assert ledger.plan(now, step, "patch", DELTA, "rdp", mechanism="client-dp").status == "ok"
    with pytest.raises(ValueError):
        ledger.plan(-1.0, step, "patch", DELTA, "rdp")


def test_print_ledger(tmp_path, capsys):
    assert print_ledger(tmp_path) == 0
    assert "no DP training recorded at this site" in capsys.readouterr().out

    ledger = PrivacyLedger(tmp_path)
    ledger.record("site-run-0042", 3, DPStep(1.3, 0.015, 120), "patient", 1e-4, "rdp")
    assert print_ledger(tmp_path) == 0
    out = capsys.readouterr().out
    assert "site-run-0042" in out and "patient" in out and "dp-sgd" in out
    assert f"{ledger.entries()[0].epsilon:.3f}" in out  # as recomputed from the steps
    assert "recomputed" in out

    ledger.path.write_text("{corrupt")
    assert print_ledger(tmp_path) == 2
    captured = capsys.readouterr()
    assert "site-run-0042" not in captured.out and "error" in captured.err


def test_moma_client_privacy_prints_the_ledger(tmp_path, call, monkeypatch):
    from moma_core.privacy.accounting import DPStep
    from moma_core.privacy.ledger import PrivacyLedger

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))  # never the real home
    cache, ledger = tmp_path / "cache", tmp_path / "state" / "ledger.json"
    empty = call("moma-client", "privacy", "--cache-dir", cache, "--ledger", ledger)
    assert empty.returncode == 0 and "no DP training" in empty.stdout
    PrivacyLedger(cache, path=ledger).record("kather-run-7", 3, DPStep(1.1, 0.01, 50), "patch",
                                             1e-5)
    shown = call("moma-client", "privacy", "--ledger", ledger)
    assert shown.returncode == 0 and "kather-run-7" in shown.stdout
    default = call("moma-client", "privacy", "--cache-dir", cache)  # the default ledger: none
    assert default.returncode == 0 and "no DP training" in default.stdout
    ledger.write_text("[]")
    broken = call("moma-client", "privacy", "--cache-dir", cache, "--ledger", ledger)
    assert broken.returncode == 2 and "error" in broken.stderr
    none = call("moma-client", "privacy")
    assert none.returncode == 2 and "--cache-dir" in none.stderr


def test_epsilon_is_never_negative_and_run_delta_is_bounded():
    """At a very large δ the accountants' bound goes below 0: reported as 0, never negative
    (a negative ε would pass any budget); a run may not ask for a δ above 1e-3."""
    from moma_core.privacy.accounting import DPStep, epsilon
    from moma_protocol.settings import ConfigError
    from tests.helpers import tiny_run

    assert epsilon([DPStep(5.0, 0.01, 10)], 0.5) >= 0.0
    with pytest.raises(ConfigError, match="dp-delta"):
        tiny_run(dp_delta=0.01)
