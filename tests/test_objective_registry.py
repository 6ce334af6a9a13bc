"""The objectives' registry: a new objective is one class, registered; the settings, the
protocol's allow-list, the sites' training and the run report follow it without an edit.

The toy objective below is registered by a fixture (and removed again afterwards, so that the
rest of the suite sees the built-in objectives only) and runs a whole federated round: the real
ServerApp round loop and ``Coordinator`` in this process, the sites' real ClientApp handlers
behind an in-process grid.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moma_core import objective_registry
from moma_core.method_config import DP_OBJECTIVES, OBJECTIVES, ObjectiveConfig
from moma_core.models import features_and_logits
from moma_core.objectives import BuildInputs, TeacherObjective, build_objective
from moma_protocol import wire
from moma_protocol.settings import ConfigError
from tests.helpers import SiteGrid, synthetic_sites, tiny_run, tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
TOY = "feature-l2"


class FeatureL2(TeacherObjective):
    """Toy: c·CE + 0.01·‖f_s − f_t‖² (the student's pooled feature pulled to the teacher's)."""

    name = TOY
    order = 99
    needs_teacher = True
    needs_index = False
    same_task_only = False
    dp_compatible = True
    needs_public_keys = False
    loss_terms = ("ce", "feature-l2")
    report_terms = ("feature-l2",)

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, inputs: BuildInputs) -> FeatureL2:
        assert inputs.teacher is not None
        return cls(inputs.teacher, cfg, bool(inputs.same_task))

    def loss(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f_s, z_s = features_and_logits(student, x)
        with torch.no_grad():
            f_t, _ = features_and_logits(self.teacher, x)
        ce = F.cross_entropy(z_s, y)
        l2 = (f_s - f_t).pow(2).sum(dim=1).mean()
        return self.cfg.ce_weight * ce + 0.01 * l2, {"ce": ce.detach(),
                                                      "feature-l2": l2.detach()}


@pytest.fixture
def toy():
    objective_registry.register(FeatureL2)
    yield FeatureL2
    objective_registry.unregister(TOY)


# -- the registry ----------------------------------------------------------------------------
def test_the_built_in_objectives_in_their_order():
    assert objective_registry.names() == ("ce", "kd", "moma", "crckd", "dp-moma")
    assert OBJECTIVES == ("ce", "kd", "moma", "crckd") and DP_OBJECTIVES == ("dp-moma",)
    assert objective_registry.dp_names() == ("ce", "kd", "dp-moma")
    assert [n for n in objective_registry.names()
            if objective_registry.needs_teacher(n)] == ["kd", "moma", "crckd", "dp-moma"]


def test_declarations_read_from_the_source_are_the_classes():
    """The registry lists the built-in objectives without importing them (no torch); what it
    read must be what each class declares."""
    for name in objective_registry.names():
        cls = objective_registry.get(name)
        assert cls.name == name
        assert objective_registry.declaration_of(cls) == objective_registry.declaration(name)


def test_an_unknown_name_is_refused_with_the_closest_names():
    with pytest.raises(objective_registry.RegistryError,
                       match="unknown objective 'mmoa'; did you mean 'moma'"):
        objective_registry.get("mmoa")
    with pytest.raises(ValueError, match="unknown objective 'nothing-like-it' \\(registered"):
        objective_registry.declaration("nothing-like-it")
    with pytest.raises(ValueError, match="unknown objective"):
        ObjectiveConfig(kind="mmoa")


def _like_toy(class_name: str, **declared) -> type:
    """A subclass of the toy declaring everything again, ``declared`` changed."""
    body = {k: getattr(FeatureL2, k) for k in objective_registry.DECLARED} | declared
    return type(class_name, (FeatureL2,), body)


def test_a_taken_name_is_refused(toy):
    with pytest.raises(objective_registry.RegistryError, match="'moma' is already"):
        objective_registry.register(_like_toy("Impostor", name="moma"))
    with pytest.raises(objective_registry.RegistryError, match=f"'{TOY}' is already registered by"):
        objective_registry.register(_like_toy("Twin"))
    assert objective_registry.get(TOY) is FeatureL2
    objective_registry.register(FeatureL2)  # the same class again (its module re-imported): kept
    with pytest.raises(objective_registry.RegistryError, match="built in"):
        objective_registry.unregister("moma")


def test_a_class_must_declare_everything_in_its_own_body():
    class Partial(FeatureL2):
        name = "partial"

    with pytest.raises(objective_registry.RegistryError,
                       match="does not declare order, needs_teacher"):
        objective_registry.register(Partial)
    assert "partial" not in objective_registry.names()


def test_a_registered_objective_reaches_settings_protocol_and_builder(toy):
    assert objective_registry.names()[-1] == TOY and TOY in objective_registry.dp_names()
    assert "train-feature-l2" in wire.TRAIN_METRICS and "train-feature-l2" in wire.METRIC_NAMES
    assert "train-other" not in wire.TRAIN_METRICS  # the allow-list still refuses the unknown
    run = tiny_run(objective=TOY, dp="dp-sgd")  # DP-SGD can run it: it says so
    assert run.objective_config().kind == TOY
    torch.manual_seed(0)
    from moma_core.models import create_classifier

    teacher, student = (create_classifier("test_efficientnet", 4) for _ in range(2))
    obj = build_objective(run.objective_config(), student, teacher)
    assert isinstance(obj, FeatureL2) and obj.same_task
    with pytest.raises(ValueError, match=f"objective '{TOY}' needs a teacher"):
        build_objective(run.objective_config(), student)
    _, parts = obj.loss(student, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert set(parts) == set(FeatureL2.loss_terms)


def test_unregistered_the_toy_is_gone_everywhere(toy):
    objective_registry.unregister(TOY)
    try:
        assert TOY not in objective_registry.names()
        assert "train-feature-l2" not in wire.TRAIN_METRICS
        with pytest.raises(ConfigError, match="is not one of ce, kd, moma, crckd, dp-moma"):
            tiny_run(objective=TOY)
    finally:
        objective_registry.register(FeatureL2)


def test_a_dp_sgd_run_needs_an_objective_that_declares_it():
    with pytest.raises(ConfigError, match="dp = dp-sgd needs objective ce, kd, dp-moma: moma"):
        tiny_run(objective="moma", dp="dp-sgd")


def test_settings_and_protocol_list_objectives_without_torch():
    script = ("import sys\n"
              "from moma_protocol import settings, wire\n"
              "from moma_core import objective_registry\n"
              "assert objective_registry.names() and 'train-nce' in wire.TRAIN_METRICS\n"
              "settings.RunConfig.from_flat({'objective': 'crckd'})\n"
              "assert 'torch' not in sys.modules, 'the registry loaded torch'\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# -- a federated round with the toy objective -----------------------------------------------
def test_a_registered_toy_objective_runs_a_federated_round(toy, tmp_path, task_identity):
    from server.server_app import run_federation

    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    sites = synthetic_sites(tmp_path, 2, n=32)
    nodes = {10 + i: site for i, site in enumerate(sites)}
    registry = tmp_path / "sites.json"
    registry.write_text(json.dumps({str(n): s["site-name"] for n, s in nodes.items()}))
    run = tiny_run(run_name="toy", objective=TOY, num_rounds=1, output_dir=str(tmp_path),
                   teacher_path=str(teacher), site_registry=str(registry), max_steps=2,
                   fraction_evaluate=0.0, round_timeout=60.0)
    grid = SiteGrid(nodes, run.to_flat())
    run_federation(grid, run)  # type: ignore[arg-type]

    assert len(grid.train_metrics) == 2  # both sites trained and their replies passed
    assert all(m["train-feature-l2"] > 0 for m in grid.train_metrics)
    results = json.loads((tmp_path / "toy" / "results.json").read_text())
    (round_1,) = results["rounds"]
    assert round_1["status"] == "ok"
    assert round_1["train"]["train-feature-l2"] > 0 and "train-ce" in round_1["train"]
    report = (tmp_path / "toy" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| round"))
    assert "| feature-l2 |" in header and "| retrieval |" in header
