"""A site's round without Flower: teacher required, allow-listed metrics (FedBN: test_fedbn)."""

import json

import pytest
import torch

from client.site_config import site_settings
from client.site_errors import MissingTeacher
from client.site_state import TeacherCache
from client.site_training import train_round
from moma_core.checkpoint import sidecar_path
from moma_core.models import Architecture, build_model
from moma_protocol.wire import TRAIN_METRICS, wire_state
from tests.helpers import IMAGE_SIZE, synthetic_sites, tiny_run, tiny_teacher


@pytest.fixture
def site(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    settings = site_settings(synthetic_sites(tmp_path, 1)[0])
    sidecar = json.loads(sidecar_path(teacher).read_text())
    return settings, teacher.read_bytes(), sidecar


def _global(run):
    torch.manual_seed(0)
    model = build_model(Architecture(run.federation.student_model, run.class_names, IMAGE_SIZE))
    return wire_state(model.state_dict())


def test_training_needs_the_cached_teacher(site):
    settings, data, sidecar = site
    run = tiny_run()
    with pytest.raises(MissingTeacher):
        train_round(settings, run, 1, _global(run), sidecar["sha256"])
    TeacherCache(settings.cache_dir).store(data, sidecar, sidecar["sha256"])
    state, n, metrics = train_round(settings, run, 1, _global(run), sidecar["sha256"])
    assert n == 48 and metrics["train-steps"] == 3 and set(state) == set(_global(run))
    assert set(metrics) <= TRAIN_METRICS and {"train-loss", "train-time-s"} <= set(metrics)


def test_a_global_student_of_another_label_space_is_refused(site):
    from client.site_training import StudentMismatch, site_data, student_for
    from moma_core.checkpoint import CheckpointError

    settings, _, _ = site
    run = tiny_run()
    data = site_data(settings, run.federation.image_size, run.training.augment)
    arch = Architecture(run.federation.student_model, ("a", "b"), IMAGE_SIZE)
    other = wire_state(build_model(arch).state_dict())
    with pytest.raises(StudentMismatch) as err:
        student_for(run, data, other, {})
    assert isinstance(err.value, CheckpointError)
