"""A site's round without Flower: teacher required, FedBN keeps normalisation layers local."""

import json

import pytest
import torch

from client.protocol import wire_state
from client.site_config import site_settings
from client.site_state import TeacherCache
from client.site_training import MissingTeacher, site_data, student_for, train_round
from moma_core.checkpoint import sidecar_path
from moma_core.models import Architecture, build_model, norm_state_keys
from tests.helpers import IMAGE_SIZE, synthetic_sites, tiny_run, tiny_teacher


@pytest.fixture
def site(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    settings = site_settings(synthetic_sites(tmp_path, 1)[0])
    sidecar = json.loads(sidecar_path(teacher).read_text())
    return settings, teacher.read_bytes(), sidecar


def _global(run):
    torch.manual_seed(0)
    model = build_model(Architecture(run.student_model, run.class_names, IMAGE_SIZE))
    return wire_state(model.state_dict())


def test_training_needs_the_cached_teacher(site):
    settings, data, sidecar = site
    run = tiny_run()
    with pytest.raises(MissingTeacher):
        train_round(settings, run, 1, _global(run), sidecar["sha256"])
    TeacherCache(settings.cache_dir).store(data, sidecar, sidecar["sha256"])
    state, n, metrics = train_round(settings, run, 1, _global(run), sidecar["sha256"])
    assert n == 48 and metrics["train-steps"] == 3 and set(state) == set(_global(run))


def test_fedbn_keeps_normalisation_layers_local(site):
    settings, data, sidecar = site
    TeacherCache(settings.cache_dir).store(data, sidecar, sidecar["sha256"])
    run = tiny_run(fedbn=True)
    start = _global(run)
    trained, _, _ = train_round(settings, run, 1, start, sidecar["sha256"])
    norm = norm_state_keys(build_model(Architecture(run.student_model, run.class_names,
                                                    IMAGE_SIZE)))
    key = next(k for k in sorted(norm) if k.endswith("running_mean"))
    assert not torch.equal(trained[key], start[key])
    # the next global model arrives with other BN values: the site keeps its own
    data_ = site_data(settings, run.image_size, run.augment)
    student = student_for(run, data_, start, {})
    assert torch.equal(student.state_dict()[key], start[key])
    from client.site_state import SiteState

    local = SiteState(settings.cache_dir, run.run_name).local_layers()
    assert set(local) == norm & set(local) and key in local
    student = student_for(run, data_, start, local)
    assert torch.equal(student.state_dict()[key], trained[key])
    conv = next(k for k in start if "conv" in k and k not in norm)
    assert torch.equal(student.state_dict()[conv], start[conv])  # the rest is global
