"""The site's privacy budget cannot be overspent or silently reset: a cap holds for every unit a
round protects, check-and-record is one locked step, and the ledger is a hash chain kept
outside the cache folder (moma_core/privacy/ledger.py, client/site_training.py)."""

import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from client.site_config import SiteSettings
from client.site_errors import PrivacyBudgetExceeded
from client.site_training import dp_round
from moma_core.privacy import ledger as ledger_module
from moma_core.privacy.accounting import DPStep, epsilon
from moma_core.privacy.ledger import (
    BudgetRefused,
    LedgerError,
    PrivacyLedger,
    budget_lines,
    print_ledger,
)
from tests.helpers import tiny_run

DELTA = 1e-5
BIG = DPStep(1.0, 0.02, 300)  # ε ≈ 2.56 at δ 1e-5; two of them ≈ 3.41


@pytest.fixture(autouse=True)
def _no_real_home(tmp_path, monkeypatch):
    """Whatever a test forgets, the default ledger never lands in the real home."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


class _Patches:
    """A training set as dp_round sees it: a length, and patient ids for patient-level DP."""

    def __init__(self, n: int, per_patient: int | None = None) -> None:
        self.n = n
        if per_patient:
            self.patient_ids = [f"P{i // per_patient:02d}" for i in range(n)]

    def __len__(self) -> int:
        return self.n


def _site(tmp_path: Path, **policy) -> SiteSettings:
    return SiteSettings(data_path="synthetic:target", cache_dir=tmp_path / "cache",
                        ledger=tmp_path / "state" / "ledger.json", **policy)


def _dp_run(**overrides):
    values = dict(objective="dp-moma", dp="dp-sgd", dp_noise_multiplier=1.1,
                  dp_max_grad_norm=1.0, dp_public_images=32, run_name="dp")
    values.update(overrides)
    return tiny_run(**values)


def _round(settings: SiteSettings, run, rnd: int = 1, train_set=None):
    return dp_round(settings, run, rnd, run.train_config(rnd), train_set or _Patches(48), 3)


# -- 1. a cap holds for every unit a round protects ------------------------------------------

def test_a_patient_level_round_is_refused_when_the_patch_level_budget_is_spent(tmp_path):
    """The audit's case: ε 3.41 spent at patch level, cap 3.0: a patient-level round spends
    the patch level's budget too (its guarantee holds for each patch) and is refused."""
    settings = _site(tmp_path, max_epsilon=3.0)
    ledger = PrivacyLedger(settings.cache_dir, path=settings.ledger)
    for rnd in (1, 2):
        ledger.record("patch-run", rnd, BIG, "patch", DELTA)
    assert ledger.spent("patch", DELTA) > 3.0
    small = DPStep(5.0, 0.01, 1)
    assert ledger.plan(3.0, small, "patient", 1e-3).status == "budget-exhausted"
    with pytest.raises(BudgetRefused) as err:
        ledger.spend("patient-run", 1, small, "patient", 1e-3, eps_max=3.0)
    assert err.value.check.status == "budget-exhausted"
    patient = _dp_run(dp_unit="patient", dp_patches_per_patient=4, batch_size=8)
    with pytest.raises(PrivacyBudgetExceeded, match="budget-exhausted"):
        _round(settings, patient, train_set=_Patches(48, per_patient=8))
    assert [e.unit for e in ledger.entries()] == ["patch", "patch"]  # nothing recorded


def test_patient_level_rounds_count_against_the_patch_level_budget(tmp_path):
    ledger = PrivacyLedger(path=tmp_path / "ledger.json")
    first = ledger.record("patient-run", 1, BIG, "patient", DELTA)
    assert first.epsilon < 3.0
    # a patch-level round composes with the patient-level one: 2.56 + that round > 3
    assert ledger.spent("patch", DELTA) == pytest.approx(first.epsilon)
    check = ledger.plan(3.0, BIG, "patch", DELTA)
    assert check.status == "would-exceed"
    assert check.epsilon_after == pytest.approx(epsilon([BIG, BIG], DELTA))
    with pytest.raises(BudgetRefused):
        ledger.spend("patch-run", 1, BIG, "patch", DELTA, eps_max=3.0)
    # a second patient-level round: both the patient and the patch level would pass 3
    assert ledger.plan(3.0, BIG, "patient", DELTA).status == "would-exceed"
    assert ledger.plan(4.0, BIG, "patient", DELTA).status == "ok"
    entry = ledger.spend("patch-run", 1, BIG, "patch", DELTA, eps_max=4.0)
    assert entry.epsilon == pytest.approx(epsilon([BIG, BIG], DELTA))  # the patch level's
    assert ledger.history("patch") == [BIG, BIG] and ledger.history("patient") == [BIG]


def test_the_patient_level_figure_says_patch_level_rounds_are_unbounded(tmp_path):
    ledger = PrivacyLedger(path=tmp_path / "ledger.json")
    ledger.record("a", 1, BIG, "patch", DELTA)
    ledger.record("b", 1, BIG, "patient", 1e-3)
    lines = budget_lines(ledger.entries())
    assert len(lines) == 2
    patch, patient = lines
    # each account at the smallest δ of its rounds: a larger δ would make ε look smaller
    assert f"{epsilon([BIG, BIG], DELTA):.3f}" in patch and "1e-05" in patch
    assert f"{epsilon([BIG], 1e-3):.3f}" in patient
    assert "without a bound" in patient and "1 patch-level" in patient


def test_client_level_dp_is_its_own_budget(tmp_path):
    ledger = PrivacyLedger(path=tmp_path / "ledger.json")
    for rnd in (1, 2):
        ledger.record("dp", rnd, BIG, "patch", DELTA)
    release = DPStep(1.0, 1.0, 1)
    cap = epsilon([release], DELTA) + 0.01
    assert ledger.plan(cap, release, "site", DELTA, mechanism="client-dp").allowed
    ledger.spend("cdp", 1, release, "site", DELTA, mechanism="client-dp", eps_max=cap)
    assert ledger.spent("patch", DELTA) == pytest.approx(epsilon([BIG, BIG], DELTA))
    assert ledger.plan(cap, release, "site", DELTA, mechanism="client-dp").status == \
        "would-exceed"


# -- 2. check and record are one operation under the ledger's lock ---------------------------

def test_two_concurrent_dp_rounds_cannot_both_pass_a_cap_only_one_fits(tmp_path, monkeypatch):
    """Both rounds compute their check at the same moment (a barrier in the accountant): with
    check and record apart both pass and both are recorded; with one locked step the second
    waits for the first, sees its entry and is refused."""
    run = _dp_run()
    step = DPStep(1.1, 1 / 3, run.train_config(1).epochs * 3)
    delta = 1 / (10 * 48)
    one, two = epsilon([step], delta), epsilon([step, step], delta)
    settings = _site(tmp_path, max_epsilon=(one + two) / 2)
    barrier, waited = threading.Barrier(2, timeout=3), set()
    real = ledger_module.epsilon

    def meeting(*args, **kwargs):
        if threading.get_ident() not in waited:  # each thread's first ε meets the other's
            waited.add(threading.get_ident())
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass
        return real(*args, **kwargs)

    monkeypatch.setattr(ledger_module, "epsilon", meeting)
    outcomes = []

    def train(rnd):
        try:
            outcomes.append(_round(settings, run, rnd))
        except PrivacyBudgetExceeded as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=train, args=(rnd,)) for rnd in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 2
    refused = [o for o in outcomes if isinstance(o, PrivacyBudgetExceeded)]
    assert len(refused) == 1 and str(refused[0]) == "would-exceed"
    assert len(PrivacyLedger(settings.cache_dir, path=settings.ledger).entries()) == 1


def test_racing_threads_record_exactly_what_the_cap_admits(tmp_path):
    ledger_path = tmp_path / "ledger.json"
    results = []

    def spend(rnd):
        try:
            results.append(PrivacyLedger(path=ledger_path).spend(
                "race", rnd, BIG, "patch", DELTA, eps_max=3.0))
        except BudgetRefused as exc:
            results.append(exc)

    threads = [threading.Thread(target=spend, args=(rnd,)) for rnd in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(not isinstance(r, BudgetRefused) for r in results) == 1
    assert len(PrivacyLedger(path=ledger_path).entries()) == 1


_RACER = """
import sys, time
from pathlib import Path
from moma_core.privacy.accounting import DPStep
from moma_core.privacy.ledger import BudgetRefused, PrivacyLedger
ledger, go, rnd = PrivacyLedger(path=Path(sys.argv[1])), Path(sys.argv[2]), int(sys.argv[3])
Path(sys.argv[2] + f".ready{rnd}").touch()
while not go.exists():
    time.sleep(0.005)
try:
    ledger.spend("race", rnd, DPStep(1.0, 0.02, 300), "patch", 1e-5, eps_max=3.0)
    print("recorded")
except BudgetRefused:
    print("refused")
"""


def test_racing_processes_record_exactly_what_the_cap_admits(tmp_path):
    ledger_path, go = tmp_path / "state" / "ledger.json", tmp_path / "go"
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(ledger_path), str(go),
                               str(rnd)], cwd=root, stdout=subprocess.PIPE, text=True)
             for rnd in range(3)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["recorded", "refused", "refused"]
    assert len(PrivacyLedger(path=ledger_path).entries()) == 1


# -- 3. no silent reset: hash chain, head file, a ledger outside the cache -------------------

def _three(path: Path) -> PrivacyLedger:
    ledger = PrivacyLedger(path=path)
    for rnd, step in enumerate((BIG, DPStep(1.2, 0.02, 100), DPStep(1.5, 0.01, 50)), 1):
        ledger.record("run", rnd, step, "patch", DELTA)
    return ledger


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data["entries"])
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change", [
    lambda es: es[0].update(epsilon=0.010),  # the audit's edit of a stored ε
    lambda es: es[1].update(steps=1),
    lambda es: es[1].update(noise_multiplier=50.0),
    lambda es: es.pop(1),  # a middle entry removed
    lambda es: es.pop(0),  # the first entry removed
    lambda es: es.reverse(),  # reordered
    lambda es: es.insert(1, dict(es[0])),  # an entry copied in
    lambda es: es.pop(),  # the last entry removed: a valid chain, but not the head's
    lambda es: es.clear(),
], ids=["epsilon", "steps", "noise", "middle", "first", "reorder", "insert", "last", "all"])
def test_any_edit_of_recorded_entries_is_refused(tmp_path, change, capsys):
    ledger = _three(tmp_path / "ledger.json")
    _edit(ledger.path, change)
    with pytest.raises(LedgerError) as err:
        ledger.entries()
    assert "\n" not in str(err.value)
    with pytest.raises(LedgerError):
        ledger.spend("r", 4, BIG, "patch", DELTA, eps_max=100.0)
    assert print_ledger(ledger) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "0.010" not in out.err


def test_a_deleted_ledger_or_head_file_is_refused(tmp_path):
    ledger = _three(tmp_path / "ledger.json")
    text = ledger.path.read_text()
    ledger.path.unlink()  # the ledger alone: the head still counts 3 entries
    with pytest.raises(LedgerError, match="missing but its head file"):
        ledger.entries()
    with pytest.raises(LedgerError):
        ledger.record("r", 4, BIG, "patch", DELTA)
    ledger.path.write_text(text)
    assert len(ledger.entries()) == 3
    ledger.head_path.unlink()
    with pytest.raises(LedgerError, match="head file .* is missing"):
        ledger.entries()


def test_the_stored_epsilon_is_never_what_is_printed(tmp_path, capsys):
    """Even a ledger whose chain and head were rewritten around an edited ε (what only a
    deliberate operator does) prints the ε recomputed from the steps."""
    ledger = PrivacyLedger(path=tmp_path / "ledger.json")
    ledger.record("run", 1, BIG, "patch", DELTA)
    ledger.record("run", 2, BIG, "patch", DELTA)
    data = json.loads(ledger.path.read_text())
    entries = [ledger_module.LedgerEntry.from_json(
        {k: v for k, v in item.items() if k not in ("prev", "hash")}) for item in data["entries"]]
    forged = [replace(e, epsilon=0.010) for e in entries]
    items = ledger_module._chained(forged)
    ledger.path.write_text(json.dumps({"version": 2, "entries": items}))
    ledger.head_path.write_text(json.dumps({"version": 2, "entries": 2,
                                            "last": items[-1]["hash"]}))
    assert [e.epsilon for e in ledger.entries()] == [0.010, 0.010]
    assert print_ledger(ledger) == 0
    out = capsys.readouterr().out
    assert "0.010" not in out and f"{epsilon([BIG, BIG], DELTA):.3f}" in out
    assert ledger.plan(3.0, BIG, "patch", DELTA).status == "budget-exhausted"


def test_wiping_the_cache_folder_does_not_reset_the_budget(tmp_path):
    run = _dp_run()
    step = DPStep(1.1, 1 / 3, run.train_config(1).epochs * 3)
    delta = 1 / (10 * 48)
    settings = _site(tmp_path, max_epsilon=(epsilon([step], delta)
                                            + epsilon([step, step], delta)) / 2)
    assert _round(settings, run).epsilon == pytest.approx(epsilon([step], delta))
    assert not settings.ledger.is_relative_to(settings.cache_dir)
    shutil.rmtree(settings.cache_dir, ignore_errors=True)
    with pytest.raises(PrivacyBudgetExceeded, match="would-exceed"):
        _round(settings, run, 2)
    assert len(PrivacyLedger(settings.cache_dir, path=settings.ledger).entries()) == 1


def test_moma_client_keeps_the_ledger_outside_the_cache_folder(tmp_path, monkeypatch):
    from flwr.common.config import parse_config_args

    from client.cli import node_config, parser, resolve
    from client.site_config import default_ledger_path, site_settings

    base = ["--insecure", "--server", "127.0.0.1:1", "--data", "synthetic:target",
            "--cache-dir", str(tmp_path / "cache")]
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_ledger_path() == tmp_path / "state" / "moma-fl" / "privacy-ledger.json"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_ledger_path() == \
        tmp_path / "home" / ".local" / "state" / "moma-fl" / "privacy-ledger.json"
    for extra, expected in (([], default_ledger_path()),
                            (["--ledger", str(tmp_path / "l.json")], tmp_path / "l.json")):
        args = resolve(parser().parse_args(base + extra))
        s = site_settings(parse_config_args([node_config(args)]))
        assert s.ledger == expected and not s.ledger.is_relative_to(s.cache_dir)
    simulated = site_settings({"data-path": "synthetic:target", "cache-dir": str(tmp_path)})
    assert simulated.ledger is None  # no ledger key: <cache-dir>/privacy/ledger.json


def _v1_ledger(cache: Path) -> Path:
    """A ledger as versions before the hash chain wrote it, in the cache folder."""
    old = cache / "privacy" / "ledger.json"
    old.parent.mkdir(parents=True)
    entry = {"run": "old-run", "round": 1, "mechanism": "dp-sgd", "noise_multiplier": 1.0,
             "sample_rate": 0.02, "steps": 300, "delta": DELTA, "unit": "patch",
             "epsilon": epsilon([BIG], DELTA), "accountant": "rdp",
             "time": "2025-01-01T00:00:00+00:00"}
    old.write_text(json.dumps({"version": 1, "entries": [entry, {**entry, "round": 2}]}))
    return old


def test_an_old_ledger_in_the_cache_folder_is_migrated_once(tmp_path):
    cache, new = tmp_path / "cache", tmp_path / "state" / "ledger.json"
    old = _v1_ledger(cache)
    ledger = PrivacyLedger(cache, path=new)
    assert [(e.run, e.round) for e in ledger.entries()] == [("old-run", 1), ("old-run", 2)]
    assert json.loads(new.read_text())["version"] == 2 and ledger.head_path.exists()
    assert json.loads(old.read_text()) == {"version": 2, "moved-to": str(new)}
    assert ledger.plan(3.0, BIG, "patch", DELTA).status == "budget-exhausted"
    # the note left in the cache folder: the old place refuses, naming the new one
    with pytest.raises(LedgerError, match="was moved to"):
        PrivacyLedger(cache).entries()
    # ... another, empty ledger for this cache folder is refused
    with pytest.raises(LedgerError, match="give --ledger"):
        PrivacyLedger(cache, path=tmp_path / "other.json").entries()
    # ... and so is the loss of the new ledger, the note still naming it
    shutil.rmtree(new.parent)
    with pytest.raises(LedgerError, match="was moved there: it was deleted"):
        PrivacyLedger(cache, path=new).entries()


def test_an_old_ledger_beside_an_existing_one_is_refused(tmp_path):
    """Two sites sharing the default ledger: the second one's old ledger is never dropped."""
    new = tmp_path / "state" / "ledger.json"
    PrivacyLedger(path=new).record("a", 1, BIG, "patch", DELTA)
    _v1_ledger(tmp_path / "cache-b")
    with pytest.raises(LedgerError, match="old privacy ledger .* exists besides"):
        PrivacyLedger(tmp_path / "cache-b", path=new).entries()


def test_a_version_1_ledger_kept_in_its_cache_folder_is_upgraded_in_place(tmp_path):
    old = _v1_ledger(tmp_path / "cache")
    ledger = PrivacyLedger(tmp_path / "cache")
    assert len(ledger.entries()) == 2
    assert json.loads(old.read_text())["version"] == 2 and ledger.head_path.exists()
    _edit(old, lambda es: es.pop())
    with pytest.raises(LedgerError, match="entries were removed"):
        ledger.entries()


def test_moma_client_privacy_migrates_verifies_and_recomputes(tmp_path, call):
    cache, new = tmp_path / "cache", tmp_path / "state" / "ledger.json"
    _v1_ledger(cache)
    shown = call("moma-client", "privacy", "--cache-dir", cache, "--ledger", new)
    assert shown.returncode == 0 and "old-run" in shown.stdout
    assert f"{epsilon([BIG, BIG], DELTA):.3f}" in shown.stdout
    _edit(new, lambda es: es[0].update(epsilon=0.010))
    broken = call("moma-client", "privacy", "--cache-dir", cache, "--ledger", new)
    assert broken.returncode == 2 and broken.stdout == ""
    assert broken.stderr.count("\n") == 1 and "entry 0 was changed" in broken.stderr
