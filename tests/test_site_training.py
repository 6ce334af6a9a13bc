"""A site's round without Flower: teacher required, allow-listed metrics (FedBN: test_fedbn)."""

import json

import pytest
import torch

from client.site_config import site_settings
from client.site_errors import MissingTeacher
from client.site_state import TeacherCache
from client.site_training import site_data, train_round
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


def test_a_site_round_is_reproducible_from_the_run_seed(tmp_path, site):
    """Same run seed, site and round → the same weights, even from a fresh site cache (the
    objective's heads, attention and queue included); another site name → another shuffle."""
    from dataclasses import replace

    settings, data, sidecar = site
    run = tiny_run()
    start = _global(run)  # (seeds torch itself: made before the loop)
    outputs = []
    for cache, name in (("a", settings.site_name), ("b", settings.site_name), ("c", "other")):
        s = replace(settings, cache_dir=tmp_path / cache, site_name=name)
        TeacherCache(s.cache_dir).store(data, sidecar, sidecar["sha256"])
        torch.manual_seed(len(outputs))  # whatever the process did before must not matter
        outputs.append(train_round(s, run, 1, start, sidecar["sha256"])[0])
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])
    assert any(not torch.equal(outputs[0][k], outputs[2][k]) for k in outputs[0])


def test_site_labels_follow_the_runs_class_names_not_the_folder_order(tmp_path):
    """The run names classes c,a,b; the site's folders sort a,b,c: labels are mapped by name.
    A site with a class the run does not know, or synthetic data in another order, is refused."""
    from client.site_training import site_data
    from moma_core.data.datasets import DataError
    from moma_core.errors import ClassMismatch
    from tests.test_eval_cli import image_folder

    root = image_folder(tmp_path / "site", {"train": {"a": 2, "b": 3, "c": 4},
                                            "val": {"a": 1, "b": 1, "c": 1}})
    settings = site_settings({"data-path": str(root), "cache-dir": str(tmp_path / "c"),
                              "site-name": "s", "device": "cpu"})
    data = site_data(settings, 32, "none", ("c", "a", "b"))
    assert data.classes == ["c", "a", "b"]
    counts = data.counts()["train"]
    assert counts == {"c": 4, "a": 2, "b": 3}
    labels = sorted(int(data.train[i][1]) for i in range(len(data.train)))
    assert labels == [0] * 4 + [1] * 2 + [2] * 3
    with pytest.raises(ClassMismatch, match=r"this site's classes \['a', 'b', 'c'\] are not the "
                       r"run's \['a', 'b'\] \(only at this site: \['c'\]\)"):
        site_data(settings, 32, "none", ("a", "b"))
    synthetic = site_settings(synthetic_sites(tmp_path, 1)[0])
    order = tuple(reversed(tiny_run().class_names))
    with pytest.raises(ClassMismatch, match="same names in another order"):
        site_data(synthetic, 32, "none", order)
    # a site that lacks one of the run's classes is not a mismatch (label skew)
    assert site_data(settings, 32, "none", ("a", "b", "c", "d")).classes == ["a", "b", "c", "d"]
    # an unreadable site is still a data error, not a class mismatch
    gone = site_settings({"data-path": str(tmp_path / "missing"), "cache-dir": str(tmp_path / "g"),
                          "site-name": "g", "device": "cpu"})
    with pytest.raises(DataError) as info:
        site_data(gone, 32, "none", ("a", "b"))
    assert not isinstance(info.value, ClassMismatch)


def test_a_residual_moma_site_keeps_its_queue_of_image_keys_between_rounds(site):
    """``moma-attention = "residual"`` at a site: the queue holds at most the site's images less
    a batch (48 − 16 = 32 here), each key with its image index (kept in the private state
    between rounds, never sent), and the round reports the NCE term's health figures."""
    from safetensors.torch import load_file

    settings, data, sidecar = site
    TeacherCache(settings.cache_dir).store(data, sidecar, sidecar["sha256"])
    run = tiny_run(moma_attention="residual", queue_size=4096)
    state, _, metrics = train_round(settings, run, 1, _global(run), sidecar["sha256"])
    assert {"train-nce", "train-nce-shuffled", "train-retrieval"} <= set(metrics)
    assert 0.0 <= metrics["train-retrieval"] <= 1.0 and metrics["train-nce"] > 0
    private = settings.cache_dir / "runs" / run.federation.run_name / "objective.safetensors"
    saved = load_file(str(private))
    assert saved["queue.queue"].shape[0] == 32
    ids = saved["queue.queue_ids"]
    # one epoch writes 48 keys into 32 rows: the last 32 images seen, each once, none of the
    # random start left
    assert len(set(ids.tolist())) == 32 and set(ids.tolist()) <= set(range(48))
    assert not any(k.startswith("queue") for k in state)  # nothing of it is sent
    _, _, metrics2 = train_round(settings, run, 2, state, sidecar["sha256"])
    after = load_file(str(private))["queue.queue_ids"]
    assert (after >= 0).all() and not torch.equal(after, ids)  # round 2 went on from round 1
    assert metrics2["train-nce"] > 0


@pytest.mark.parametrize("objective", ["moma", "crckd"])
def test_a_site_and_the_local_only_baseline_train_the_same_rounds(tmp_path, site, objective):
    """The local-only baseline (moma-simulate's and the benchmark's) is the site's own round
    function, not a copy: one site's two rounds through the site's code, fed its own student
    back, end in the very tensors the baseline's two rounds end in (MoMA's heads, attention
    and queue, carried on the site's disk in one and in memory in the other)."""
    from server.baseline import start_student, train_alone

    settings, data, sidecar = site
    TeacherCache(settings.cache_dir).store(data, sidecar, sidecar["sha256"])
    run = tiny_run(objective=objective)
    teacher = tmp_path / "teacher.safetensors"
    state = wire_state(start_student(run, teacher)[0].state_dict())
    for rnd in (1, 2):
        state, _, _ = train_round(settings, run, rnd, state, sidecar["sha256"])
    train = site_data(settings, run.federation.image_size, run.training.augment,
                      run.class_names).train
    alone, _, _, history, steps = train_alone(run, train, settings.site_name, teacher)
    assert len(history) == 2 and steps == 6
    baseline = wire_state(alone.state_dict())
    assert set(baseline) == set(state)
    differ = [k for k in state if not torch.equal(state[k], baseline[k])]
    assert differ == []


def test_a_warm_teacher_cache_trains_as_a_cold_one(site):
    """A site process that has loaded the teacher before (a warm worker, another site's round
    in simulation) trains a site's first round exactly as a fresh process does: the objective
    is seeded after the student and the teacher are built, not before."""
    import shutil

    from client import site_state

    settings, data, sidecar = site
    TeacherCache(settings.cache_dir).store(data, sidecar, sidecar["sha256"])
    run = tiny_run()
    start = _global(run)
    private = settings.cache_dir / "runs" / run.federation.run_name
    outputs = []
    for warm in (False, True):
        if not warm:
            site_state._LOADED.clear()  # the teacher is built from its file in this round
        shutil.rmtree(private, ignore_errors=True)  # each time the site's first round
        outputs.append(train_round(settings, run, 1, start, sidecar["sha256"])[0])
    assert site_state._LOADED  # the second round took the teacher from the process's memo
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])
