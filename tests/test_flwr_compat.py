"""Flower's internals as the product relies on them, checked against the installed Flower.

Every internal Flower name the product uses is an entry of one compat module's ``INTERNALS``
(``moma_protocol``, ``server``, ``client``, ``deploy``; ``tests/test_layout.py`` keeps them
there). A Flower upgrade that removes or renames one, or a parameter or attribute the product
relies on, fails here with the name rather than deep in a federation.
"""

import importlib
import inspect
import tomllib
from pathlib import Path

import pytest

from moma_protocol import flwr_compat as compat

ROOT = Path(__file__).resolve().parents[1]
COMPAT_MODULES = ["moma_protocol.flwr_compat", "server.flwr_compat", "client.flwr_compat",
                  "deploy.flwr_compat"]


def test_the_installed_flower_is_the_pinned_minor_version():
    assert compat.version_problem() is None
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    flwr = [d for d in deps if d.replace(" ", "").startswith("flwr[")]
    assert len(flwr) == 1
    assert flwr[0].replace(" ", "").endswith(",".join(compat.FLWR_TESTED)), \
        "pyproject's flwr range and moma_protocol.flwr_compat.FLWR_TESTED differ"
    assert compat.FLWR_TESTED == (f">={'.'.join(map(str, compat.FLWR_MINOR))}",
                                  f"<{compat.FLWR_MINOR[0]}.{compat.FLWR_MINOR[1] + 1}")


def test_another_flower_version_is_reported(monkeypatch):
    monkeypatch.setattr(compat, "version", lambda name: "1.43.0")
    assert "flwr 1.43.0 is installed" in compat.version_problem()


@pytest.mark.parametrize("module", COMPAT_MODULES)
def test_every_internal_name_is_still_in_flower(module):
    assert compat.problems(importlib.import_module(module).INTERNALS) == []


@pytest.mark.parametrize("module", COMPAT_MODULES)
def test_every_entry_says_why_and_what_would_replace_it(module):
    for name, entry in importlib.import_module(module).INTERNALS.items():
        assert entry.module.startswith("flwr."), name
        assert entry.why.strip() and entry.public.strip(), name


@pytest.mark.parametrize("module", COMPAT_MODULES)
def test_the_names_resolve_through_the_compat_module(module):
    mod = importlib.import_module(module)
    for name, entry in mod.INTERNALS.items():
        if name in vars(mod) or not name.isidentifier():  # a helper of the module's own; a
            continue  # name checked but replaced, never imported (the SecAgg+ mask generators)
        assert getattr(mod, name) is entry.resolve(), name
    with pytest.raises(AttributeError, match="no attribute"):
        mod.not_a_flower_name  # noqa: B018


def test_a_name_looked_up_late_sees_what_flower_has_now(monkeypatch):
    """A test (or Flower) replacing a module attribute is seen by the next import."""
    import flwr.superlink.cli

    monkeypatch.setattr(flwr.superlink.cli, "flower_superlink", "replaced")
    from deploy.flwr_compat import flower_superlink

    assert flower_superlink == "replaced"


def test_a_removed_name_fails_with_its_name(monkeypatch):
    from flwr.server.workflow import constant

    from server import flwr_compat as server_compat

    monkeypatch.delattr(constant, "MAIN_CONFIGS_RECORD")
    assert compat.problems(server_compat.INTERNALS) == [
        "MAIN_CONFIGS_RECORD: flwr.server.workflow.constant.MAIN_CONFIGS_RECORD is gone"]


def test_a_renamed_parameter_or_a_lost_attribute_fails_with_its_name(monkeypatch):
    import flwr.supercore.differential_privacy as dp
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    from server import flwr_compat as server_compat

    monkeypatch.setattr(dp, "compute_stdv", lambda noise, clipping_norm, num_sampled_clients: 0)
    monkeypatch.delattr(Key, "MASKED_PARAMETERS")
    found = compat.problems(server_compat.INTERNALS)
    assert "compute_stdv: flwr.supercore.differential_privacy.compute_stdv lacks the " \
           "parameters ['noise_multiplier']" in found
    assert any(p.startswith("Key: ") and "MASKED_PARAMETERS" in p for p in found)
    assert len(found) == 2


def test_a_module_that_is_gone_fails_with_its_name():
    entries = {"gone": compat.Internal("flwr.no_such_module", "x", why="w", public="p")}
    assert compat.problems(entries)[0].startswith("gone: module flwr.no_such_module cannot")


def test_the_strategies_keep_the_state_the_aggregator_saves():
    """server.aggregation saves and restores these attributes of Flower's strategies."""
    from flwr.serverapp import strategy

    from server.flwr_compat import STRATEGY_STATE

    made = {"FedAdam": strategy.FedAdam(), "FedAvgM": strategy.FedAvgM(),
            "DifferentialPrivacyClientSideFixedClipping":
                strategy.DifferentialPrivacyClientSideFixedClipping(strategy.FedAvg(), 1.0, 1.0, 1)}
    assert set(made) == set(STRATEGY_STATE)
    for name, attrs in STRATEGY_STATE.items():
        assert [a for a in attrs if not hasattr(made[name], a)] == [], name


def test_the_strategies_read_of_a_reply_only_what_the_stand_in_has():
    """AcceptedReply stands in for a Message in aggregate_train: Flower's FedAvg reads a valid
    reply's ``content`` and ``has_error()`` only (the metadata of error replies only)."""
    from flwr.serverapp.strategy import FedAvg

    source = inspect.getsource(FedAvg._check_and_log_replies) + \
        inspect.getsource(FedAvg.aggregate_train)
    assert "msg.has_error()" in source and "msg.content" in source
    assert [line for line in source.splitlines() if "msg.metadata" in line] == \
        ["                msg.metadata.src_node_id,"]  # logged for error replies only


def test_the_secaggplus_workflow_looks_up_its_setup_stage_on_the_instance():
    """server.flwr_compat.train_on_contents replaces setup_stage on one workflow."""
    from flwr.server.workflow import SecAggPlusWorkflow

    assert "self.setup_stage" in inspect.getsource(SecAggPlusWorkflow.__call__)
    assert "state.nid_to_fitins[nid]" in inspect.getsource(
        SecAggPlusWorkflow.collect_masked_vectors_stage)


def test_the_mask_generator_is_swapped_in_both_modules(monkeypatch):
    modules = [importlib.import_module(m) for m in compat.MASK_MODULES]
    for m in modules:
        monkeypatch.setattr(m, "pseudo_rand_gen", m.pseudo_rand_gen)  # restored afterwards

    def generator(seed, num_range, dimensions_list):
        return []

    compat.install_mask_generator(generator)
    assert all(m.pseudo_rand_gen is generator for m in modules)
    monkeypatch.delattr(modules[0], "pseudo_rand_gen")
    with pytest.raises(RuntimeError, match="Flower's SecAgg\\+ changed"):
        compat.install_mask_generator(generator)


def test_the_site_launcher_imports_flowers_superexec_from_its_entry(tmp_path):
    from client import app_guard
    from client.flwr_compat import INTERNALS

    app_guard.write_launcher(tmp_path)
    entry = INTERNALS["flower_superexec"]
    assert f"from {entry.module} import {entry.attr}  # noqa: E402" in \
        (tmp_path / "flower-superexec").read_text()
