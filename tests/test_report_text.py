"""report.md and curves.png explain themselves: the round-1 student's copied tensors, the loss
columns (and which are empty or 0 by design), the last round's doubled download, chance
levels (also dashed in the plots), and a run without ``--eval-source`` (said, not shown as
empty panels, and without a matplotlib warning)."""

from __future__ import annotations

import json
import warnings

import pytest

from moma_core import report as report_mod
from server.results import RunResults
from server.server_app import run_federation
from tests.test_live_status import ScriptedGrid, federation_run

CLASSES = "benign,grade_1,grade_2,grade_3"


def _round(n: int, train: dict | None, final: bool = False, server: bool = True) -> dict:
    entry = {"round": n, "status": "ok", "train": train,
             "sites": {"1": {"site_name": "a", "status": "ok", "teacher_bytes":
                             2_000_000 if n == 1 else 0}},
             "bytes_down": 3_000_000, "bytes_up": 1_000_000, "wall_s": 2.0,
             "federated_eval": {"accuracy": 0.5, "macro_f1": 0.4, "kappa": 0.2},
             "federated_eval_sites": {"1": {"accuracy": 0.5, "site-name": "a"}},
             "checkpoint": f"c{n}"}
    if server:
        entry["server_eval"] = {"accuracy": 0.6, "macro_f1": 0.5, "kappa": 0.3}
    if final:
        entry["final_evaluation_bytes"] = {"down": 1_000_000, "up": 1000}
        entry["bytes_down"] += 1_000_000
    return entry


def results(tmp_path, objective: str, train: dict | None, server: bool = True,
            init: str = "teacher (86 of 88 tensors; not copied: classifier.weight, "
                        "classifier.bias (the classifier: the teacher's classes are not "
                        "the run's))") -> RunResults:
    r = RunResults(tmp_path)
    r.data = {"config": {"run-name": "x", "objective": objective, "classes": CLASSES,
                         "batch-size": 16, "num-rounds": 2},
              "init": init, "teacher_sha256": "ab" * 32,
              "rounds": [_round(1, train, server=server), _round(2, train, True, server)],
              "final": {"status": "ok", "best_round": 2, "best_by": "server_eval",
                        "best_checkpoint": "c2"}}
    return r


MOMA = {"train-ce": 1.0, "train-kl": 0.0, "train-nce": 2.0, "train-nce-shuffled": 3.0,
        "train-retrieval": 0.3}


def test_the_report_explains_init_columns_bytes_and_chance(tmp_path):
    text = results(tmp_path, "moma", MOMA).write_report().read_text()
    assert "Round-1 student: teacher (86 of 88 tensors; not copied: classifier.weight" in text
    assert "the teacher's class k is not the run's class k" in text
    assert "accuracy 0.250 (1/4 classes)" in text
    for col in ("`ce`", "`kl`", "`nce`", "`nce gap`", "`retrieval`"):
        assert col in text
    assert "(chance 0.062 = 1/batch size)" in text
    assert "`kl` is 0 in every round by design: the teacher's classes are not the run's" in text
    assert "empty by design" not in text  # MoMA has every term
    assert "Round 2's download** includes the final evaluation" in text
    assert "1.00 MB down" in text and "about twice" in text
    assert "Round 1's download** includes the teacher (2.00 MB" in text
    assert "| test acc |" in text and "No held-out set" not in text


def test_ce_says_which_columns_are_empty_by_design(tmp_path):
    text = results(tmp_path, "ce", {"train-ce": 1.0}).write_report().read_text()
    for col in ("kl", "nce", "nce gap", "retrieval"):
        assert f"`{col}` is empty by design: objective `ce`" in text, col
    assert "is 0 in every round" not in text


def test_kl_that_carries_signal_is_not_called_zero(tmp_path):
    text = results(tmp_path, "kd", {"train-ce": 1.0, "train-kl": 0.4}).write_report() \
        .read_text()
    assert "is 0 in every round" not in text
    assert "`nce` is empty by design: objective `kd`" in text


def test_plots_mark_chance_dashed(tmp_path, monkeypatch):
    """The accuracy panels carry a dashed line at 1/classes, the retrieval panel at 1/batch."""
    figures = []
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", figures.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results(tmp_path, "moma", MOMA).plot()
    (fig,) = figures
    dashed = {ax.get_title(): [ln.get_ydata()[0] for ln in ax.get_lines()
                               if ln.get_linestyle() == "--"] for ax in fig.axes}
    assert dashed["global accuracy"] == [0.25] and dashed["per-site val accuracy"] == [0.25]
    assert dashed["NCE in-batch retrieval (train)"] == [1 / 16]
    assert dashed["bytes on the wire (MB)"] == []


def test_a_run_without_eval_source_says_so(tmp_path, task_identity, monkeypatch):  # noqa: F811
    """A real run without --eval-source: no empty test columns or panels, a note instead, and
    no matplotlib warning."""
    figures = []
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", figures.append)
    run = federation_run(tmp_path, [10, 11], num_rounds=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_federation(ScriptedGrid({10: "ok", 11: "ok"}), run)  # type: ignore[arg-type]
    data = json.loads((tmp_path / "live" / "results.json").read_text())
    assert all("server_eval" not in r for r in data["rounds"])
    text = (tmp_path / "live" / "report.md").read_text()
    assert "No held-out set at the coordinator" in text and "`--eval-source`" in text
    assert "test acc" not in text and "test F1" not in text
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes]
    assert "global macro-F1 / kappa (sites' val; no --eval-source)" in titles
    for ax in fig.axes:  # every panel shows data or says why not
        assert ax.get_lines() or ax.texts, ax.get_title()
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert "server test" not in labels and "federated val" in labels


def test_an_empty_panel_says_why_without_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = results(tmp_path, "ce", {"train-ce": 1.0}, server=False)
        for entry in r.data["rounds"]:
            entry["federated_eval"] = None
            entry["federated_eval_sites"] = {}
        r.plot()
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_plot_curves_notes_and_lines(tmp_path, monkeypatch):
    figures = []
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", figures.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_mod.plot_curves(tmp_path / "p.png", [1, 2], {"a": {"s": [None, None]},
                                                             "b": {"s": [0.1, 0.2]}},
                               "round", hlines={"a": (0.5, "chance"), "b": (0.5, "chance")},
                               notes={"a": "nothing measured"})
    (fig,) = figures
    a, b = fig.axes
    assert [t.get_text() for t in a.texts] == ["nothing measured"] and not a.get_lines()
    assert [ln.get_linestyle() for ln in b.get_lines()] == ["-", "--"]
    assert b.get_legend() is not None


@pytest.mark.parametrize("init", ["random (init-from-teacher is off)"])
def test_a_random_start_is_reported_as_such(tmp_path, init):
    text = results(tmp_path, "moma", MOMA, init=init).write_report().read_text()
    assert f"Round-1 student: {init}.**" in text and "copy of the teacher" not in text
