"""``runs/<name>/tensorboard/``: per-round scalars equal to results.json's, one per round even
after a resume (read back with TensorBoard's own EventAccumulator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from server.server_app import run_federation
from server.tensorboard import round_scalars
from tests.test_live_status import ScriptedGrid, federation_run

SITE_METRICS = {10: {"accuracy": 0.6, "dp-epsilon": 1.5, "train-ce": 1.25},
                11: {"accuracy": 0.7, "dp-epsilon": 2.5, "train-ce": 0.75}}


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def check_against_results(run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    rounds = results["rounds"]
    tb = scalars(run_dir)
    for tag, points in tb.items():  # one value per round, never twice
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), (tag, steps)
    approx = pytest.approx

    def at(tag: str, step: int) -> float:
        return dict(tb[tag])[step]

    assert [s for s, _ in tb["server/accuracy"]] == [r["round"] for r in rounds]
    for r in rounds:
        n = r["round"]
        for key in ("accuracy", "macro_f1", "kappa"):
            assert at(f"server/{key}", n) == approx(r["server_eval"][key], rel=1e-6)
        assert at("train/ce", n) == approx(r["train"]["train-ce"], rel=1e-6)
        assert at("train/nce", n) == approx(r["train"]["train-nce"], rel=1e-6)
        assert at("train/kl", n) == approx(r["train"]["train-kl"], abs=1e-9)
        assert at("train/retrieval", n) == approx(r["train"]["train-retrieval"], rel=1e-6)
        assert at("train/nce_gap", n) == approx(
            r["train"]["train-nce-shuffled"] - r["train"]["train-nce"], rel=1e-6)
        for site in r["sites"].values():
            name = site["site_name"]
            assert at(f"site_val_accuracy/{name}", n) == approx(
                site["incoming_eval"]["accuracy"], rel=1e-6)
            assert at(f"privacy/epsilon/{name}", n) == approx(site["metrics"]["dp-epsilon"])
        final = r.get("final_evaluation_bytes") or {"down": 0, "up": 0}
        assert at("bytes/down", n) + final["down"] == r["bytes_down"]
        assert at("bytes/up", n) + final["up"] == r["bytes_up"]
        assert at("time/wall_s", n) == approx(r["wall_s"], rel=1e-6)
        assert at("sites/ok", n) == 2
    last = rounds[-1]
    assert at("bytes/final_evaluation_down", last["round"]) == \
        last["final_evaluation_bytes"]["down"] > 0
    # the sites' different scores and train terms really are per site / weighted
    assert at("site_val_accuracy/hospital-a", 1) == approx(0.6)
    assert at("site_val_accuracy/hospital-b", 1) == approx(0.7)


def test_scalars_equal_results_json_and_a_resume_does_not_repeat_a_round(
        tmp_path, task_identity):  # noqa: F811
    run = federation_run(tmp_path, [10, 11], num_rounds=3, eval_source="synthetic:target")
    run_federation(ScriptedGrid({10: "ok", 11: "ok"}, SITE_METRICS), run)  # type: ignore
    run_dir = tmp_path / "live"
    check_against_results(run_dir)
    # the coordinator was killed in round 3: results.json lost it, TensorBoard had it
    path = run_dir / "results.json"
    data = json.loads(path.read_text())
    data["rounds"] = data["rounds"][:2]
    data["final"] = None
    path.write_text(json.dumps(data))
    before = dict(scalars(run_dir)["server/accuracy"])
    assert sorted(before) == [1, 2, 3]
    resumed = federation_run(tmp_path, [10, 11], num_rounds=3, eval_source="synthetic:target",
                             resume=True)
    metrics = {n: {**m, "accuracy": m["accuracy"] - 0.1} for n, m in SITE_METRICS.items()}
    run_federation(ScriptedGrid({10: "ok", 11: "ok"}, metrics), resumed)  # type: ignore
    check_against_results(run_dir)  # round 3 once, with the resumed run's values
    assert dict(scalars(run_dir)["site_val_accuracy/hospital-a"])[3] == pytest.approx(0.5)


def test_client_level_epsilon_and_missing_values():
    entry = {"round": 2, "train": None, "sites": {}, "bytes_down": 10, "bytes_up": 5,
             "client_dp": {"epsilon": 3.5}, "wall_s": 1.0}
    out = round_scalars(entry)
    assert out == {"privacy/client_epsilon": 3.5, "bytes/down": 10.0, "bytes/up": 5.0,
                   "sites/ok": 0.0, "time/wall_s": 1.0}
