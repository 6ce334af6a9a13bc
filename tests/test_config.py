"""Run settings: one tree, one default per setting, strict validation; generated files agree."""

import argparse
import tomllib
from pathlib import Path

import pytest

from moma_core.objectives import ObjectiveConfig
from moma_core.train import TrainConfig
from moma_protocol.settings import ConfigError, RunConfig, defaults, markdown_table
from server.flwr_app import COMPONENTS, default_run_config, run_config_arg, write_app

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_flower_config_is_the_settings_tree():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == COMPONENTS
    assert flwr["config"] == default_run_config() == defaults()


def test_configuration_doc_is_generated_from_the_tree():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert markdown_table() in doc
    for key in defaults():
        assert f"| `{key}` |" in doc


def test_method_defaults_are_taken_from_the_method_layer():
    run = RunConfig()
    assert run.objective.queue_size == ObjectiveConfig().queue_size == 4096
    assert run.training.lr == TrainConfig().lr
    assert run.training.local_epochs == TrainConfig().epochs
    assert run.objective_config() == ObjectiveConfig()


def _defaults(parser: argparse.ArgumentParser) -> dict:
    return {a.dest: a.default for a in parser._actions}


def test_commands_take_their_run_defaults_from_the_tree():
    """A command option for a run setting either defaults to the tree's value or is unset
    (None: the tree's default applies)."""
    from moma_core.cli.distill import parser as distill_parser
    from server.cli import parser as server_parser
    from server.simulate import RUN_KEYS
    from server.simulate import parser as simulate_parser

    flat = RunConfig().to_flat()
    sim = vars(simulate_parser().parse_args([]))
    for opt in RUN_KEYS:
        assert sim[opt] is None, opt
    assert _defaults(server_parser())["rounds"] is None
    distill = vars(distill_parser().parse_args([]))
    assert distill["queue_size"] == flat["queue-size"]
    assert distill["lr"] == flat["lr"]
    assert distill["teacher_update"] == flat["teacher-update"]
    assert distill["attention_keys"] == flat["attention-keys"]
    assert distill["batch_size"] == flat["batch-size"]  # 32, the federation's (was 64)


def test_generated_app_folder_holds_no_code(tmp_path):
    app = write_app(tmp_path / "app")
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]
    data = tomllib.loads((app / "pyproject.toml").read_text())
    assert data["tool"]["flwr"]["app"]["config"] == default_run_config()


def test_run_config_round_trip():
    text = run_config_arg({"num-rounds": 4, "run-name": "x", "fedbn": True, "lr": 0.5})
    values = {}
    for item in text.split(" "):
        values.update(tomllib.loads(item))
    run = RunConfig.from_flat(values)
    assert (run.federation.num_rounds, run.federation.run_name, run.federation.fedbn,
            run.training.lr) == (4, "x", True, 0.5)
    assert RunConfig.from_flat(run.to_flat()) == run


@pytest.mark.parametrize("values,message", [
    ({"lr": "abc"}, "run-config lr: expected a number, got 'abc'"),
    ({"lr": -1.0}, "run-config lr: -1.0 must be above 0"),
    ({"num-rounds": 0}, "run-config num-rounds: 0 must be at least 1"),
    ({"batch-size": 0}, "run-config batch-size: 0 must be at least 1"),
    ({"aggregation": "mean"}, "run-config aggregation: 'mean' is not one of"),
    ({"objective": "crd"}, "run-config objective: 'crd' is not one of"),
    ({"nmu-rounds": 3}, "unknown run-config key 'nmu-rounds' (did you mean 'num-rounds'?)"),
    ({"fedbn": 1}, "run-config fedbn: expected true or false"),
    ({"num-rounds": 2.5}, "run-config num-rounds: expected an integer"),
    ({"trim-fraction": 0.5}, "run-config trim-fraction: 0.5 must be below 0.5"),
    ({"round-timeout": float("nan")}, "not a finite number"),
    ({"classes": 3}, "run-config classes: expected text"),
    ({"min-train-nodes": 3, "min-available-nodes": 2}, "min-available-nodes must be at least"),
])
def test_bad_values_are_refused_with_one_line_naming_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat(values)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_round_learning_rate_follows_a_cosine():
    run = RunConfig.from_flat({"num-rounds": 5, "lr": 0.1})
    lrs = [run.train_config(r).lr for r in range(1, 6)]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    constant = run.with_values(lr_schedule="constant")
    assert {constant.train_config(r).lr for r in range(1, 6)} == {0.1}
    fedprox = RunConfig.from_flat({"aggregation": "fedprox", "proximal-mu": 0.5})
    assert fedprox.train_config(1).proximal_mu == 0.5
    assert RunConfig().train_config(1).proximal_mu == 0.0


def test_train_config_refuses_zero_epochs_and_a_bad_rate():
    with pytest.raises(ValueError, match="epochs 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="learning rate"):
        TrainConfig(lr=-1)


def test_a_simulated_node_gets_its_site_from_the_spec_or_an_absolute_cache(tmp_path):
    import json

    from client.site_config import SiteConfigError, site_settings

    plain = site_settings({"partition-id": 2, "num-partitions": 3})
    assert plain.data_path == "synthetic:target" and plain.site_index == 2
    assert plain.cache_dir.is_absolute() and plain.cache_dir.name == "site-2"
    spec = tmp_path / "sites.json"
    spec.write_text(json.dumps([{"data-path": "/a", "cache-dir": "/c/0"},
                                {"data-path": "/b", "cache-dir": "/c/1", "site-name": "b"}]))
    one = site_settings({"partition-id": 1, "num-partitions": 2}, str(spec))
    assert (one.data_path, str(one.cache_dir), one.site_name) == ("/b", "/c/1", "b")
    with pytest.raises(SiteConfigError, match="does not describe"):
        site_settings({"partition-id": 5, "num-partitions": 6}, str(spec))
    # a real SuperNode's node config (no partition-id) is never redirected by the spec
    real = site_settings({"data-path": "/mine", "cache-dir": "/var/moma"}, str(spec))
    assert real.data_path == "/mine"
