"""Patient-level DP-SGD (``dp-unit = patient``): patients sampled, a patient's contribution to a
step bounded by the clipping norm, the patient's ε accounted, the site's ledger in patients."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from moma_core.data.synthetic import TARGET_CLASSES, generate
from moma_core.method_config import TrainConfig
from moma_core.privacy.accounting import DPStep, epsilon
from moma_core.privacy.dp_sgd import DPConfig, PrivacyIncompatibleError, make_private_training
from moma_core.privacy.patient_sampling import (
    PatientPoissonSampler,
    patient_groups,
    patient_steps_per_epoch,
)

# ------------------------------------------------------------------------------ sampling


def test_patients_join_independently_and_bring_at_most_k_patches():
    ids = ["a"] * 30 + ["b"] * 2 + ["c"] * 5 + ["d"]
    groups = patient_groups(ids)
    assert [len(g) for g in groups] == [30, 2, 5, 1]
    owner = {i: pid for i, pid in enumerate(ids)}
    sampler = PatientPoissonSampler(groups, 4, 0.3, 4000, torch.Generator().manual_seed(1))
    joined: Counter = Counter()
    empty = 0
    for batch in sampler:
        per = Counter(owner[i] for i in batch)
        assert len(set(batch)) == len(batch)  # no patch twice in a step
        assert all(n == min(4, ids.count(p)) for p, n in per.items())  # all of it, up to k
        joined.update(per.keys())
        empty += not batch
    for p in "abcd":  # each patient joins about 30 % of the steps, whatever its size
        assert joined[p] / 4000 == pytest.approx(0.3, abs=0.03), p
    assert empty / 4000 == pytest.approx(0.7 ** 4, abs=0.03)
    assert sampler.expected_batch_size() == pytest.approx(0.3 * (4 + 2 + 4 + 1))
    # the patches a large patient brings vary between steps (a random subset, not the first k)
    seen = {i for batch in sampler for i in batch if owner[i] == "a"}
    assert len(seen) == 30


def test_an_epoch_draws_the_batch_size_in_patches_on_average():
    groups = patient_groups([f"p{i // 10}" for i in range(200)])  # 20 patients × 10
    assert patient_steps_per_epoch(groups, 4, 16) == 5  # 80 usable patches / 16
    assert patient_steps_per_epoch(groups, 100, 16) == 13
    with pytest.raises(ValueError, match="no patient id"):
        patient_groups(["a", "", "b"])
    with pytest.raises(ValueError):
        patient_steps_per_epoch(groups, 0, 16)


# ------------------------------------------------------------------------ the mechanism


class _Patches(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, patient_ids: list[str] | None):
        self.x, self.y, self.patient_ids = x, y, patient_ids

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


class _Objective(nn.Module):
    name = "ce"
    dp_compatible = True

    def loss(self, student, x, y):
        loss = nn.functional.cross_entropy(student(x), y)
        return loss, {"ce": float(loss.detach())}

    def trainable_parameters(self):
        return []


def _wrapped(unit: str, k: int = 8, clip: float = 1.0, ids=True):
    torch.manual_seed(0)
    n = 64
    x, y = torch.randn(n, 20) * 50, torch.randint(0, 3, (n,))  # large per-sample gradients
    data = _Patches(x, y, [f"p{i // 16}" for i in range(n)] if ids else None)
    student = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=16)
    config = DPConfig(max_grad_norm=clip, noise_multiplier=0.7, delta=1e-5, unit=unit,
                      patches_per_patient=k)
    private = make_private_training(student, _Objective(), optimizer, loader, config,
                                    TrainConfig(epochs=1, lr=0.1, optimizer="sgd"))
    return private, data


def _summed_clipped_norm(private, x, y) -> float:
    """The norm of Σ clipped per-sample gradients of one batch, before noise."""
    private.optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(private.module(x), y)
    loss.backward()
    private.optimizer.clip_and_accumulate()
    norm = torch.cat([p.summed_grad.flatten() for p in private.optimizer.params]).norm()
    private.optimizer.zero_grad(set_to_none=True)
    return float(norm)


def test_one_patients_patches_move_a_step_by_at_most_the_clipping_norm():
    """k patches of one patient: per patient the summed clipped gradient stays within C; at
    the patch level (each patch clipped to C) the same patches sum to far more than C."""
    k, clip = 8, 1.0
    patient, data = _wrapped("patient", k, clip)
    x, y = data.x[:k], data.y[:k]  # patient p0's k patches
    norm = _summed_clipped_norm(patient, x, y)
    assert norm <= clip * (1 + 1e-5)
    assert norm > 0.25 * clip  # large gradients: each patch is clipped to C/k
    patch, _ = _wrapped("patch", k, clip)
    assert _summed_clipped_norm(patch, x, y) > 2 * clip  # what patient-level clipping prevents
    patient.close(), patch.close()


def test_the_patients_epsilon_is_accounted_with_the_patients_noise_and_rate():
    private, data = _wrapped("patient", k=4)
    # 4 patients of 16 patches, at most 4 each: 16 usable patches, batch 16 → 1 step per epoch
    assert len(private.loader) == 1 and private.sample_rate == 1.0
    assert private.optimizer.noise_multiplier == pytest.approx(0.7 * 4)  # per patch: σ·k
    assert private.optimizer.max_grad_norm == pytest.approx(1.0 / 4)  # per patch: C/k
    for batch in private.loader:
        x, y = batch
        if len(y):
            loss = nn.functional.cross_entropy(private.module(x), y)
            private.optimizer.zero_grad()
            loss.backward()
        else:
            private.noise_step()
            continue
        private.optimizer.step()
    report = private.close()
    assert (report.unit, report.patches_per_patient, report.steps) == ("patient", 4, 1)
    assert report.noise_multiplier == 0.7 and report.max_grad_norm == 1.0
    assert report.epsilon == pytest.approx(epsilon([DPStep(0.7, 1.0, 1)], 1e-5), rel=1e-9)
    # Opacus' own accountant saw the per-patch multiplier σ·k, which would under-state it
    assert epsilon([DPStep(0.7 * 4, 1.0, 1)], 1e-5) < report.epsilon / 2


def test_patient_level_needs_the_patients():
    with pytest.raises(PrivacyIncompatibleError, match="patient_id"):
        _wrapped("patient", ids=False)
    with pytest.raises(ValueError, match="unit"):
        DPConfig(noise_multiplier=1.0, unit="slide")
    with pytest.raises(ValueError, match="patches per patient"):
        DPConfig(noise_multiplier=1.0, unit="patient", patches_per_patient=0)


# ---------------------------------------------------------------------------- at a site


def _patient_manifest(root: Path, patients: int = 6, per_patient: int = 8) -> Path:
    images, labels = generate("target", patients * per_patient, 3, image_size=32)
    (root / "img").mkdir(parents=True)
    lines = ["path,label,patient_id"]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(np.asarray(image)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{TARGET_CLASSES[int(label)]},P{i // per_patient:02d}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def test_a_site_trains_patient_level_and_its_ledger_counts_patients(tmp_path):
    from client.site_errors import PrivacyRefused, error_category
    from client.site_training import train_round
    from moma_core.models import build_model
    from moma_core.privacy.ledger import PrivacyLedger
    from moma_protocol.wire import DP_EPSILON, wire_state
    from tests.helpers import site_with_teacher, tiny_run

    settings, sha = site_with_teacher(tmp_path)
    run = tiny_run(objective="dp-moma", dp="dp-sgd", dp_noise_multiplier=1.1,
                   dp_trainable="all", dp_optimizer="adamw", dp_lr=0.003,
                   dp_public_images=32, run_name="pat", dp_unit="patient",
                   dp_patches_per_patient=4, batch_size=8)
    torch.manual_seed(0)
    start = wire_state(build_model(run.student_architecture()).state_dict())
    # synthetic data names no patients: refused before anything is spent
    with pytest.raises(PrivacyRefused, match="patient_id") as err:
        train_round(settings, run, 1, start, sha)
    assert error_category(err.value) == "privacy-refused"
    assert PrivacyLedger(settings.cache_dir).entries() == []
    site = replace(settings, data_path=str(_patient_manifest(tmp_path / "data")))
    state, n, metrics = train_round(site, run, 1, start, sha)
    assert set(state) == set(start) and metrics[DP_EPSILON] > 0
    [entry] = PrivacyLedger(settings.cache_dir).entries()
    # the train split is 3/4 of 48 patches of 6 patients; at most 4 patches each → ≤ 24
    # usable, batch 8: 3 steps per epoch, so a patient joins a step with probability 1/3
    assert (entry.unit, entry.mechanism) == ("patient", "dp-sgd")
    assert entry.sample_rate == pytest.approx(1 / 3) and entry.steps == 3
    assert entry.delta == pytest.approx(1 / (10 * 6))  # δ per patient, not per patch
    assert metrics[DP_EPSILON] == pytest.approx(
        epsilon([DPStep(1.1, 1 / 3, 3)], entry.delta), rel=1e-9)
