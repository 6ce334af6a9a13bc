"""CRCKD behind the same interface: standalone distillation and a site's round."""

from __future__ import annotations

import json

import pytest
import torch

from client.site_config import site_settings
from client.site_state import SiteState, TeacherCache
from client.site_training import train_round
from moma_core.checkpoint import sidecar_path
from moma_core.cli.distill import distill, parser
from moma_core.crckd import CRCKD
from moma_core.models import Architecture, build_model
from moma_protocol.wire import TRAIN_METRICS, wire_state
from tests.helpers import IMAGE_SIZE, TARGET_CLASSES, synthetic_sites, tiny_run, tiny_teacher


def test_moma_distill_trains_crckd_with_its_per_sample_banks(tmp_path, monkeypatch):
    ccd: list[float] = []  # each step's CCD, as the objective computed it
    loss = CRCKD.loss

    def recording(self, *args, **kwargs):
        total, parts = loss(self, *args, **kwargs)
        ccd.append(float(parts["ccd"]))
        return total, parts

    monkeypatch.setattr(CRCKD, "loss", recording)
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    args = parser().parse_args([
        "--teacher", str(teacher), "--objective", "crckd", "--name", "c",
        "--runs-dir", str(tmp_path), "--n", "48", "--test-n", "0", "--epochs", "2",
        "--batch-size", "16", "--image-size", str(IMAGE_SIZE), "--augment", "flip"])
    results = distill(args)
    first, last = results["history"][0], results["history"][-1]
    assert {"train_ccd", "train_crp", "train_ce"} <= set(last)
    steps = len(ccd) // 2
    assert steps >= 2 and len(ccd) == 2 * steps, ccd  # two epochs of the same steps
    # the first step has no written row to contrast with; every step writes its batch's rows
    # into the banks, so from the second step on (in epoch 1 already) CCD contrasts them
    assert ccd[0] == 0.0 and all(c > 0 for c in ccd[1:]), ccd
    assert first["train_ccd"] == pytest.approx(sum(ccd[:steps]) / steps)  # epoch means
    assert last["train_ccd"] == pytest.approx(sum(ccd[steps:]) / steps)
    assert last["train_crp"] >= 0
    assert json.loads((tmp_path / "c" / "results.json").read_text())["objective"]["kind"] == \
        "crckd"


def test_a_site_round_with_crckd_keeps_its_banks_at_the_site(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher.safetensors", classes=TARGET_CLASSES)
    settings = site_settings(synthetic_sites(tmp_path, 1)[0])
    sidecar = json.loads(sidecar_path(teacher).read_text())
    TeacherCache(settings.cache_dir).store(teacher.read_bytes(), sidecar, sidecar["sha256"])
    run = tiny_run(objective="crckd")
    torch.manual_seed(0)
    arch = Architecture(run.federation.student_model, run.class_names, IMAGE_SIZE)
    start = wire_state(build_model(arch).state_dict())
    sent, n, metrics = train_round(settings, run, 1, start, sidecar["sha256"])
    assert {"train-ccd", "train-crp"} <= set(metrics) <= TRAIN_METRICS
    assert set(sent) == set(start)  # only the student travels
    saved, _ = SiteState(settings.cache_dir, run.federation.run_name).load(sidecar["sha256"])
    labels = saved["bank_labels"]
    assert labels.numel() == 48 and int((labels >= 0).sum()) == n  # every sample written once
    _, _, metrics2 = train_round(settings, run, 2, sent, sidecar["sha256"])
    assert metrics2["train-ccd"] > 0  # round 2 starts from the banks round 1 left
