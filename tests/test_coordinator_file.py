"""The coordinator's own settings (paths of its host) never reach the sites: moma-server keeps
them in runs/<name>/coordinator.json, named in the SuperLink's environment, and submits the
rest as the run config. (A real deployment's SuperLink state holds none of those paths:
tests/test_site_lifecycle.py.)"""

from __future__ import annotations

import json
import stat

import pytest

from moma_protocol import coordinator_file
from moma_protocol.settings import ConfigError, RunConfig
from server.cli import overrides, parser
from server.flwr_app import run_config_arg


def test_the_submitted_run_config_carries_no_coordinator_setting(tmp_path):
    teacher = tmp_path / "secret-teacher-dir" / "t.safetensors"
    args = parser().parse_args(["--insecure", "--classes", "a,b", "--eval-source",
                                str(tmp_path / "held-out"), "--runs-dir", str(tmp_path),
                                "--run-config", "objective=\"ce\""])
    values = overrides(args, tmp_path / "runs", None, tmp_path / "sites.json")
    values["teacher-path"] = str(teacher)
    submitted, own = coordinator_file.split(values)
    text = run_config_arg(submitted)
    assert str(tmp_path) not in text, text
    assert {"teacher-path", "output-dir", "site-registry", "eval-source"} <= set(own)
    assert not set(submitted) & coordinator_file.coordinator_keys()
    assert "classes" in submitted and "run-name" in submitted  # the sites' settings stay


def test_the_server_app_reads_the_coordinator_file_over_its_run_config(tmp_path):
    path = coordinator_file.write(tmp_path / "coordinator.json",
                                  {"teacher-path": "/srv/t.safetensors",
                                   "output-dir": "/srv/runs"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    flat = coordinator_file.server_run_config({"lr": 0.1, "teacher-path": ""},
                                              {coordinator_file.COORDINATOR_ENV: str(path)})
    run = RunConfig.from_flat(flat)
    assert run.coordinator.teacher_path == "/srv/t.safetensors" and run.training.lr == 0.1
    # without the variable (a simulation): the run config as it is
    assert coordinator_file.server_run_config({"teacher-path": "x"}, {}) == {"teacher-path": "x"}


@pytest.mark.parametrize("content,needle", [
    ("{not json", "unreadable coordinator settings"),
    (json.dumps({"lr": 5.0}), "not a coordinator settings file"),  # a site setting smuggled
    (json.dumps(["teacher-path"]), "not a coordinator settings file"),
])
def test_a_bad_coordinator_file_is_refused_in_one_line(tmp_path, content, needle):
    path = tmp_path / "coordinator.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        coordinator_file.server_run_config({}, {coordinator_file.COORDINATOR_ENV: str(path)})
    with pytest.raises(ConfigError, match="unreadable"):
        coordinator_file.server_run_config(
            {}, {coordinator_file.COORDINATOR_ENV: str(tmp_path / "missing.json")})


def test_only_coordinator_keys_are_written(tmp_path):
    with pytest.raises(ConfigError, match="'lr' is not a coordinator setting"):
        coordinator_file.write(tmp_path / "c.json", {"lr": 0.1})


def test_the_student_is_the_teachers_architecture_unless_the_run_config_names_one(tmp_path):
    """docs/deploy.md's steps train an efficientnet_b0 teacher and start moma-server without a
    student-model: the run takes the teacher's model (MoMA's momentum teacher needs it), as it
    takes its image size; a student named in --run-config is kept (and checked)."""
    import torch

    from moma_core.checkpoint import save_checkpoint
    from moma_core.models import Architecture, build_model

    arch = Architecture("resnet10t", ("a", "b"), 32)
    teacher = tmp_path / "t.safetensors"
    save_checkpoint(teacher, build_model(arch).state_dict(), arch)
    torch.manual_seed(0)

    def submitted(*extra):
        args = parser().parse_args(["--insecure", "--classes", "x,y", *extra])
        return overrides(args, tmp_path / "runs", teacher, None)

    assert submitted()["student-model"] == "resnet10t"
    assert submitted()["image-size"] == 32
    kept = submitted("--run-config", 'student-model="test_efficientnet" teacher-update="frozen"')
    assert kept["student-model"] == "test_efficientnet"
    # (a student the momentum teacher cannot follow is refused before anything starts:
    # tests/test_coordinator_refusals.py)
