"""DP-SGD on part of the student (``dp-trainable``) and large logical batches from small
physical ones.

A frozen BatchNorm layer in eval mode is a fixed per-channel affine map: each sample's output
depends on that sample alone, so the student keeps the teacher's BatchNorm statistics and the
per-sample gradients Opacus clips are exact — a batch gives every sample what it gets alone
(with a negative control: BatchNorm in train mode does mix the samples).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moma_core.models import create_classifier
from moma_core.objectives import ObjectiveConfig, build_objective
from moma_core.privacy.dp_sgd import (
    FROZEN_BN,
    DPConfig,
    freeze_for_dp,
    private_compatibility_problems,
    trainable_names,
)
from moma_core.train import TrainConfig, train_local

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning",
    "ignore:Secure RNG turned off:UserWarning",
    "ignore:Optimal order is the:UserWarning",
)
C = 4


def _teacher_like(name: str = "test_efficientnet") -> nn.Module:
    """A BatchNorm classifier whose running statistics are not the initial ones (as a
    teacher's after training), no dropout (so that outputs compare exactly)."""
    torch.manual_seed(0)
    model = create_classifier(name, C, drop_rate=0.0).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    return model


def test_the_trained_parts_by_name():
    model = _teacher_like()
    assert trainable_names(model, "head") == {"classifier.weight", "classifier.bias"}
    last = trainable_names(model, "last-stage")
    assert {"classifier.weight", "classifier.bias"} < last
    assert all(n.startswith(("blocks.4.", "conv_head.", "classifier.")) for n in last)
    assert not any(".bn" in n for n in last)  # BatchNorm stays frozen there too
    assert trainable_names(model, "all") == {n for n, _ in model.named_parameters()}
    resnet = create_classifier("resnet18", C)
    last = trainable_names(resnet, "last-stage")
    assert any(n.startswith("layer4.") for n in last) and "fc.weight" in last
    assert not any(n.startswith("layer3.") or ".bn" in n for n in last)


@pytest.mark.parametrize("trainable", ["head", "last-stage"])
def test_a_frozen_batchnorm_student_gives_each_sample_what_it_gets_alone(trainable):
    model = _teacher_like()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    frozen = freeze_for_dp(model, trainable)
    model.train()  # as the training loop does: the frozen BatchNorm layers ignore it
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, C, (6,))
    together = model(x)
    alone = torch.cat([model(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # not moved
    # Opacus' per-sample gradients (what it clips) equal each sample's gradient alone
    assert private_compatibility_problems(model) == []
    gsm = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and len(params) == len(trainable_names(model, trainable))
    per_sample = [p.grad_sample.detach().clone() for p in params]
    gsm._close()
    for i in range(6):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for p, g in zip(params, per_sample, strict=True):
            torch.testing.assert_close(g[i], p.grad, atol=1e-5, rtol=1e-4)
    frozen.restore()
    assert all(p.requires_grad for p in model.parameters())
    assert not any(getattr(m, FROZEN_BN, False) for m in model.modules())


def test_negative_control_batchnorm_in_train_mode_mixes_the_samples():
    model = _teacher_like().train()
    x = torch.randn(6, 3, 32, 32)
    together = model(x)
    halves = torch.cat([model(x[:3]), model(x[3:])])  # the same samples in other company
    assert not torch.allclose(together, halves, atol=1e-3)
    assert any("BatchNorm" in p for p in private_compatibility_problems(model))


def test_dp_sgd_on_the_head_moves_the_classifier_only_and_keeps_the_statistics():
    model = _teacher_like()
    before = copy.deepcopy(model.state_dict())
    data = TensorDataset(torch.randn(40, 3, 32, 32), torch.randint(0, C, (40,)))
    obj = build_objective(ObjectiveConfig(kind="ce"), model)
    result = train_local(model, obj, DataLoader(data, batch_size=8),
                         TrainConfig(epochs=1, lr=0.5, optimizer="sgd", seed=0),
                         privacy=DPConfig(noise_multiplier=0.5, trainable="head"))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}
    assert result.privacy.steps == 5 and result.privacy.epsilon > 0
    assert all(p.requires_grad for p in model.parameters())  # undone after the call


def test_a_student_with_trained_batchnorm_is_still_refused():
    model = _teacher_like()
    data = TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, C, (16,)))
    obj = build_objective(ObjectiveConfig(kind="ce"), model)
    with pytest.raises(ValueError, match="BatchNorm"):
        train_local(model, obj, DataLoader(data, batch_size=8), TrainConfig(seed=0),
                    privacy=DPConfig(noise_multiplier=1.0, trainable="all"))


def test_a_logical_batch_from_small_physical_ones_is_the_same_step(monkeypatch):
    """The same Poisson batches, noise close to 0: splitting each logical batch of ~24 into
    physical batches of 5 changes nothing but the memory (same clipped sum, same steps)."""
    batches = [[0, 3, 4, 7, 8, 9, 12, 13, 15, 18, 20, 21, 22, 25, 27, 30, 31, 33, 34, 38],
               list(range(1, 40, 2)) + [0, 2]]

    def fixed(self):
        yield from (list(b) for b in batches[:self.steps])

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", fixed)
    data = TensorDataset(torch.randn(40, 3, 32, 32), torch.randint(0, C, (40,)))
    states, reports = [], []
    for physical in (0, 5):
        model = _teacher_like()
        obj = build_objective(ObjectiveConfig(kind="ce"), model)
        result = train_local(model, obj, DataLoader(data, batch_size=20),
                             TrainConfig(epochs=1, lr=0.5, optimizer="sgd", seed=0),
                             privacy=DPConfig(noise_multiplier=1e-6, max_grad_norm=0.1,
                                              trainable="last-stage",
                                              physical_batch=physical))
        states.append(model.state_dict())
        reports.append(result)
    assert [r.privacy.steps for r in reports] == [2, 2]
    assert [r.metrics["steps"] for r in reports] == [2.0, 2.0]
    assert reports[0].num_examples == reports[1].num_examples == 42
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, atol=1e-5, rtol=1e-4)
    assert not torch.equal(states[0]["classifier.weight"], _teacher_like().classifier.weight)
