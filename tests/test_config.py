"""Run configuration: pyproject defaults agree with the code; the generated app folder."""

import tomllib
from pathlib import Path

import pytest

from moma_core.config import RunConfig
from server.flwr_app import COMPONENTS, default_run_config, run_config_arg, write_app

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_flower_config_matches_the_code():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == COMPONENTS
    assert flwr["config"] == default_run_config()


def test_generated_app_folder_holds_no_code(tmp_path):
    app = write_app(tmp_path / "app")
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]
    data = tomllib.loads((app / "pyproject.toml").read_text())
    assert data["tool"]["flwr"]["app"]["config"] == default_run_config()


def test_run_config_round_trip_and_validation():
    text = run_config_arg({"num-rounds": 4, "run-name": "x", "fedbn": True, "lr": 0.5})
    values = {}
    for item in text.split(" "):
        values.update(tomllib.loads(item))
    run = RunConfig.from_flat(values)
    assert (run.num_rounds, run.run_name, run.fedbn, run.lr) == (4, "x", True, 0.5)
    with pytest.raises(ValueError, match="aggregation"):
        RunConfig.from_flat({"aggregation": "mean"})
    with pytest.raises(ValueError):
        RunConfig.from_flat({"objective": "crd"})


def test_round_learning_rate_follows_a_cosine():
    run = RunConfig(num_rounds=5, lr=0.1)
    lrs = [run.train_config(r).lr for r in range(1, 6)]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert RunConfig(aggregation="fedprox", proximal_mu=0.5).train_config(1).proximal_mu == 0.5
    assert RunConfig(aggregation="fedavg").train_config(1).proximal_mu == 0.0
