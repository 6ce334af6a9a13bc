"""Metrics against scikit-learn; the training loop's determinism, FedProx and divergence guard."""

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score
from torch.utils.data import DataLoader, TensorDataset

from moma_core.metrics import classification_metrics
from moma_core.models import create_classifier
from moma_core.objectives import ObjectiveConfig, build_objective
from moma_core.train import TrainConfig, TrainingDiverged, train_local


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    m = classification_metrics(torch.tensor(p), torch.tensor(y), 4)
    assert m["accuracy"] == pytest.approx((p == y).mean())
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"), abs=1e-6)
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, p, weights="quadratic"), abs=1e-5)
    assert m["confusion"] == confusion_matrix(y, p, labels=range(4)).tolist()
    assert len(m["per_class_recall"]) == 4


def _data(n=64, classes=3):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g),
                         torch.randint(0, classes, (n,), generator=g))


def _run(seed, kind="moma", **cfg):
    torch.manual_seed(123)
    teacher = create_classifier("test_efficientnet", 3)
    student = create_classifier("test_efficientnet", 3)
    student.load_state_dict(teacher.state_dict())
    obj = build_objective(ObjectiveConfig(kind=kind, queue_size=32, feat_dim=32), student,
                          teacher)
    loader = DataLoader(_data(), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return student, train_local(student, obj, loader,
                                TrainConfig(epochs=2, lr=0.01, seed=seed, **cfg))


def test_train_local_is_deterministic_on_cpu():
    _, a = _run(0)
    _, b = _run(0)
    _, c = _run(1)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert any(not torch.equal(a.state[k], c.state[k]) for k in a.state)
    assert a.num_examples == 128 and a.metrics["steps"] == 8 and len(a.history) == 2
    assert {"loss", "ce", "kl", "nce"} <= set(a.metrics)


def test_max_steps_bounds_the_work():
    _, r = _run(0, max_steps=3)
    assert r.metrics["steps"] == 3 and r.num_examples == 48


def test_fedprox_keeps_the_student_closer_to_its_start():
    start = create_classifier("test_efficientnet", 3).state_dict()

    def distance(mu):
        torch.manual_seed(123)
        student = create_classifier("test_efficientnet", 3)
        student.load_state_dict(start)
        obj = build_objective(ObjectiveConfig(kind="ce"), student)
        loader = DataLoader(_data(), batch_size=16)
        r = train_local(student, obj, loader, TrainConfig(epochs=2, lr=0.05, seed=0,
                                                          proximal_mu=mu, cosine=False))
        return sum(float((r.state[k].float() - start[k].float()).norm())
                   for k in start if start[k].is_floating_point())

    assert distance(mu=10.0) < distance(mu=0.0)


def test_divergence_is_reported():
    student = create_classifier("test_efficientnet", 3)
    with torch.no_grad():
        student.get_classifier().weight.fill_(float("nan"))
    obj = build_objective(ObjectiveConfig(kind="ce"), student)
    with pytest.raises(TrainingDiverged):
        train_local(student, obj, DataLoader(_data(), batch_size=16), TrainConfig())
