"""DP-MoMA and DP-SGD: per-sample separability (with a negative control on published MoMA),
private training through the one loop, clipping, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moma_core.data.synthetic import TARGET_CLASSES, generate
from moma_core.models import Architecture, build_model
from moma_core.objectives import MoMA, ObjectiveConfig, build_objective
from moma_core.privacy.dp_moma import DPMoMA, QueueAttention, public_queue
from moma_core.privacy.dp_sgd import (
    DPConfig,
    PrivacyIncompatibleError,
    make_private_compatible,
    make_private_training,
    private_parts,
    use_contiguous_grad_samplers,
)
from moma_core.train import TrainConfig, train_local

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning",
    "ignore:Secure RNG turned off:UserWarning",
)

SIZE = 32
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
SMALL = dict(feat_dim=32, queue_size=64, num_heads=4)


def _images(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = generate(task, n, seed=seed, image_size=SIZE)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return (x - MEAN) / STD, torch.from_numpy(labels).long()


def _model(seed: int, drop_rate: float = 0.2) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(Architecture("test_efficientnet", TARGET_CLASSES, SIZE,
                                    drop_rate=drop_rate))


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    return _model(0)  # keeps its BatchNorm: frozen, eval mode, never wrapped


@pytest.fixture(scope="module")
def public_keys(teacher) -> torch.Tensor:
    x, _ = _images("source", 24, seed=7)  # synthetic, non-private images
    return public_queue(teacher, x)


@pytest.fixture(scope="module")
def private_data() -> TensorDataset:
    return TensorDataset(*_images("target", 24, seed=1))


def _dp_moma(teacher, public_keys, drop_rate=0.0, **cfg):
    student = make_private_compatible(_model(1, drop_rate))
    obj = build_objective(ObjectiveConfig(kind="dp-moma", **{**SMALL, **cfg}), student, teacher,
                          public_keys=public_keys)
    return student, obj


def _wrap(student, obj) -> GradSampleModule:
    student.train()
    obj.train()
    gsm = GradSampleModule(private_parts(student, obj))
    use_contiguous_grad_samplers(gsm)  # as make_private_training does
    return gsm


def _grad_samples(gsm: GradSampleModule, obj, student, x, y) -> torch.Tensor:
    """Opacus' per-sample gradients (B × all trainable parameters) of ``obj``'s loss."""
    params = [p for p in gsm.parameters() if p.requires_grad]
    for p in params:
        p.grad, p.grad_sample = None, None
    loss, _ = obj.loss(student, x, y)
    loss.backward()
    return torch.cat([p.grad_sample.reshape(len(x), -1) for p in params], dim=1).detach()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _perturbed(x: torch.Tensor, j: int) -> torch.Tensor:
    x2 = x.clone()
    x2[j] = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(5))
    return x2


def test_queue_attention_is_multi_head_attention_of_one_query_over_the_keys():
    torch.manual_seed(0)
    dim, heads, k = 16, 4, 10
    ref = nn.MultiheadAttention(dim, heads, bias=True, batch_first=True)
    with torch.no_grad():
        ref.in_proj_bias.normal_()  # includes a key bias: it cancels in the softmax
    att = QueueAttention(dim, heads)
    w_q, w_k, w_v = ref.in_proj_weight.split(dim)
    b_q, _, b_v = ref.in_proj_bias.split(dim)
    dh = dim // heads
    with torch.no_grad():
        att.q.weight.copy_(w_q)
        att.q.bias.copy_(b_q)
        for h in range(heads):
            att.key_maps[h].weight.copy_(w_k[h * dh:(h + 1) * dh].t())
            att.value_maps[h].weight.copy_(w_v[h * dh:(h + 1) * dh])
            att.value_maps[h].bias.copy_(b_v[h * dh:(h + 1) * dh])
        att.proj.load_state_dict(ref.out_proj.state_dict())
    x, keys = torch.randn(3, dim), torch.randn(k, dim)
    expected, _ = ref(x[:, None], keys.expand(3, k, dim), keys.expand(3, k, dim))
    torch.testing.assert_close(att(x, keys), expected[:, 0], rtol=1e-5, atol=1e-5)
    assert att.attention_matrix(x, keys).shape == (3, heads, k)


def test_per_sample_gradient_depends_on_its_own_sample_only(teacher, public_keys,
                                                            private_data):
    student, obj = _dp_moma(teacher, public_keys)
    assert isinstance(obj, DPMoMA) and obj.same_task
    gsm = _wrap(student, obj)
    x, y = private_data.tensors[0][:4], private_data.tensors[1][:4]
    # channels-last images (HWC arrays permuted): Opacus' own conv sampler gets these wrong
    assert not x.is_contiguous()
    g = _grad_samples(gsm, obj, student, x, y)

    # sample j's image changes: every other sample's per-sample gradient stays the same
    g2 = _grad_samples(gsm, obj, student, _perturbed(x, 3), y)
    for i in range(3):
        assert _rel(g2[i], g[i]) < 1e-4
    assert _rel(g2[3], g[3]) > 1e-2

    # and it is the gradient of that sample's loss alone
    gsm.disable_hooks()
    for i in (0, 2):
        for p in gsm.parameters():
            p.grad = None
        obj.loss(student, x[i:i + 1], y[i:i + 1])[0].backward()
        alone = torch.cat([p.grad.reshape(-1) for p in gsm.parameters() if p.requires_grad])
        assert _rel(g[i], alone) < 1e-4
    gsm.enable_hooks()

    # earlier private batches (same parameters) leave no trace: the queue is the public keys
    for start in (4, 12):
        xb, yb = private_data.tensors[0][start:start + 8], private_data.tensors[1][start:start + 8]
        obj.loss(student, xb, yb)[0].backward()
        obj.after_step(student)
    assert torch.equal(obj.public_keys, public_keys)
    g3 = _grad_samples(gsm, obj, student, x, y)
    assert _rel(g3, g) < 1e-4
    gsm.cleanup()


def test_negative_control_published_moma_mixes_samples(teacher, private_data):
    """The same instrument on objectives.MoMA: sample i's gradient moves with sample j's image
    (batch-token attention) and with earlier batches (the queue) — so the test above can fail."""
    student = make_private_compatible(_model(1, drop_rate=0.0))
    obj = build_objective(ObjectiveConfig(kind="moma", teacher_update="frozen",
                                          moma_attention="reference",
                                          queue_keys="keys", **SMALL), student, teacher)
    assert isinstance(obj, MoMA) and not getattr(obj, "dp_compatible", False)
    for m in obj.modules():  # (Opacus' hooks refuse MoMA's in-place ReLU; no effect on values)
        if getattr(m, "inplace", False):
            m.inplace = False
    gsm = _wrap(student, obj)
    x, y = private_data.tensors[0][:4], private_data.tensors[1][:4]
    g = _grad_samples(gsm, obj, student, x, y)
    g2 = _grad_samples(gsm, obj, student, _perturbed(x, 3), y)
    assert max(_rel(g2[i], g[i]) for i in range(3)) > 1e-2
    queue0 = obj.queue.queue.clone()
    obj.loss(student, private_data.tensors[0][4:12], private_data.tensors[1][4:12])[0].backward()
    obj.after_step(student)  # enqueues keys of private images
    assert not torch.equal(obj.queue.queue, queue0)
    g3 = _grad_samples(gsm, obj, student, x, y)
    assert _rel(g3[0], g[0]) > 1e-3
    gsm.cleanup()


def test_private_training_through_train_local(teacher, public_keys, private_data):
    original = _model(1)
    student = make_private_compatible(original)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in original.modules())
    obj = build_objective(ObjectiveConfig(kind="dp-moma", **SMALL), student, teacher,
                          public_keys=public_keys)
    before = [p.detach().clone() for p in student.parameters()]
    loader = DataLoader(private_data, batch_size=6, shuffle=True)
    cfg = TrainConfig(max_steps=2, lr=0.01, seed=0)
    r2 = train_local(student, obj, loader, cfg, privacy=DPConfig(noise_multiplier=1.0))
    assert all(math.isfinite(v) for v in r2.metrics.values())
    assert {"loss", "ce", "kl", "nce"} <= set(r2.metrics) and r2.metrics["steps"] == 2
    p = r2.privacy
    assert p is not None and p.steps == 2 and p.noise_multiplier == 1.0
    assert p.sample_rate == pytest.approx(1 / len(loader)) and p.epsilon > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert torch.equal(obj.public_keys, public_keys)  # no private key ever entered the queue
    assert not any(m._forward_hooks for m in student.modules())  # Opacus' hooks are removed
    assert not any(hasattr(q, "grad_sample") for q in student.parameters())

    r3 = train_local(student, obj, loader, TrainConfig(max_steps=3, lr=0.01, seed=0),
                     privacy=DPConfig(noise_multiplier=1.0))
    assert r3.privacy.steps == 3 and r3.privacy.epsilon > p.epsilon
    assert torch.equal(obj.public_keys, public_keys)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())


def test_clipping_bounds_each_per_sample_gradient(teacher, public_keys, private_data,
                                                  monkeypatch):
    student, obj = _dp_moma(teacher, public_keys, drop_rate=0.2)
    c = 1e-3
    seen = []
    original = DPOptimizer.clip_and_accumulate

    def recording(self):
        raw = torch.cat([g.reshape(len(g), -1) for g in self.grad_samples], dim=1).clone()
        original(self)
        summed = torch.cat([q.summed_grad.reshape(-1) for q in self.params])
        seen.append((raw, summed.clone(), self.max_grad_norm))

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", recording)
    loader = DataLoader(private_data, batch_size=6, shuffle=True)
    train_local(student, obj, loader, TrainConfig(max_steps=2, seed=0),
                privacy=DPConfig(noise_multiplier=0.5, max_grad_norm=c))
    assert len(seen) == 2
    for raw, summed, bound in seen:
        assert bound == c
        norms = raw.norm(dim=1)
        assert (norms > c).all()  # clipping is active at this bound
        factors = (c / (norms + 1e-6)).clamp(max=1.0)
        clipped = raw * factors[:, None]
        assert (clipped.norm(dim=1) <= c * (1 + 1e-5)).all()
        assert _rel(summed, clipped.sum(0)) < 1e-4  # what Opacus summed: the clipped ones


def test_empty_poisson_batch_is_a_counted_noise_step(teacher, public_keys, private_data):
    student, obj = _dp_moma(teacher, public_keys)
    params = list(student.parameters()) + list(obj.trainable_parameters())

    def wrap():
        return make_private_training(student, obj, torch.optim.SGD(params, lr=0.1),
                                     DataLoader(private_data, batch_size=6),
                                     DPConfig(noise_multiplier=1.0), TrainConfig())

    wrap()  # a call that ends in an exception leaves its hooks: the next wrapping drops them
    obj.loss(student, *private_data[:3])[0].backward()
    private = wrap()
    assert len(student.conv_stem._forward_hooks) == len(obj.attn_q.q._forward_hooks) == 1
    before = [q.detach().clone() for q in params]
    private.noise_step()
    report = private.close()
    assert report.steps == 1 and report.epsilon > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, params, strict=True))


def test_refusals_and_settings(teacher, public_keys, private_data):
    loader = DataLoader(private_data, batch_size=6)
    dp = DPConfig(noise_multiplier=1.0)
    with_bn = _model(1)
    kd = build_objective(ObjectiveConfig(kind="kd"), with_bn, teacher)
    with pytest.raises(PrivacyIncompatibleError, match=r"bn1: BatchNormAct2d"):
        train_local(with_bn, kd, loader, TrainConfig(max_steps=1), privacy=dp)
    student = make_private_compatible(with_bn)
    moma = build_objective(ObjectiveConfig(kind="moma", teacher_update="frozen", **SMALL),
                           student, teacher)
    with pytest.raises(PrivacyIncompatibleError, match="'moma' is not compatible"):
        train_local(student, moma, loader, TrainConfig(max_steps=1), privacy=dp)
    obj = build_objective(ObjectiveConfig(kind="dp-moma", **SMALL), student, teacher,
                          public_keys=public_keys)
    with pytest.raises(PrivacyIncompatibleError, match="proximal"):
        train_local(student, obj, loader, TrainConfig(proximal_mu=0.1), privacy=dp)
    with pytest.raises(ValueError, match="needs public_keys"):
        build_objective(ObjectiveConfig(kind="dp-moma"), student, teacher)
    with pytest.raises(ValueError, match="L2-normalised"):
        DPMoMA(teacher, student, ObjectiveConfig(**SMALL), True, public_keys * 2)
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig(noise_multiplier=1.0, target_epsilon=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig()
    with pytest.raises(ValueError, match="dp_attention"):
        ObjectiveConfig(dp_attention="batch")
    # no attention, and no NCE term: still one loss per sample, heads frozen when unused
    x, y = private_data.tensors[0][:3], private_data.tensors[1][:3]
    plain = build_objective(ObjectiveConfig(kind="dp-moma", dp_attention="none", **SMALL),
                            student, teacher, public_keys=public_keys)
    assert plain.attn_q is None and set(plain.loss(student, x, y)[1]) == {"ce", "kl", "nce"}
    no_nce = build_objective(ObjectiveConfig(kind="dp-moma", nce_weight=0.0, **SMALL), student,
                             teacher, public_keys=public_keys)
    assert not list(no_nce.trainable_parameters())
    assert set(no_nce.loss(student, x, y)[1]) == {"ce", "kl"}


def test_the_dp_noise_is_not_replayed_by_the_run_seed(teacher, public_keys, private_data):
    """A site seeds torch with a seed derived from the run's public seed (reproducible rounds);
    DP-SGD's noise and Poisson batches must not follow it, or anyone knowing the seed could
    replay the noise and subtract it. Two private calls from identical weights and seeds end
    in different weights; the same calls without DP end in the same weights."""
    def train(private: bool) -> list[torch.Tensor]:
        student = make_private_compatible(_model(1))
        obj = build_objective(ObjectiveConfig(kind="dp-moma", **SMALL), student, teacher,
                              public_keys=public_keys)
        loader = DataLoader(private_data, batch_size=6, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        train_local(student, obj, loader, TrainConfig(max_steps=2, lr=0.01, seed=0),
                    privacy=DPConfig(noise_multiplier=1.0) if private else None)
        return [p.detach().clone() for p in student.parameters()]

    plain = [train(False), train(False)]
    assert all(torch.equal(a, b) for a, b in zip(*plain, strict=True))  # the seed holds
    private = [train(True), train(True)]
    assert any(not torch.equal(a, b) for a, b in zip(*private, strict=True))


@pytest.mark.parametrize("stride,padding,dilation,kernel,bias", [
    (1, 1, 1, 3, False), (2, 1, 1, 3, True), (2, 2, 1, 5, False), (1, 2, 2, 3, True)])
def test_the_depthwise_sampler_equals_opacus_conv_sampler(stride, padding, dilation, kernel,
                                                          bias):
    from opacus.grad_sample.conv import compute_conv_grad_sample

    from moma_core.privacy.dp_sgd import _with_depthwise

    torch.manual_seed(0)
    layer = nn.Conv2d(12, 12, kernel, stride=stride, padding=padding, dilation=dilation,
                      groups=12, bias=bias)
    x = torch.randn(5, 12, 17, 17)
    backprops = torch.randn_like(layer(x))
    fast = _with_depthwise(compute_conv_grad_sample)(layer, [x], backprops)
    reference = compute_conv_grad_sample(layer, [x], backprops)
    assert set(fast) == set(reference)
    for p, g in reference.items():
        assert fast[p].shape == g.shape and torch.allclose(fast[p], g, atol=1e-5), p.shape
    # a convolution that is not depthwise goes to Opacus' own sampler
    dense = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(3, 4, 9, 9)
    b = torch.randn_like(dense(x))
    got = _with_depthwise(compute_conv_grad_sample)(dense, [x], b)
    assert torch.equal(got[dense.weight], compute_conv_grad_sample(dense, [x], b)[dense.weight])


def test_opacus_runs_as_many_steps_an_epoch_as_the_sites_ledger_counts(teacher, public_keys):
    """1488 patches at batch 16: 93 batches, the steps a site's ledger records per epoch
    (``round_steps``); Opacus' own count, int(1 / (1 / 93)), is 92."""
    from moma_core.privacy.accounting import round_steps

    student, obj = _dp_moma(teacher, public_keys)
    params = list(student.parameters()) + list(obj.trainable_parameters())
    data = TensorDataset(torch.zeros(1488, 3, 4, 4), torch.zeros(1488, dtype=torch.long))
    loader = DataLoader(data, batch_size=16)
    private = make_private_training(student, obj, torch.optim.SGD(params, lr=0.1), loader,
                                    DPConfig(noise_multiplier=1.0), TrainConfig())
    try:
        assert len(loader) == round_steps(1, len(loader)) == 93
        assert len(private.loader) == 93
        assert sum(1 for _ in private.loader.batch_sampler) == 93
    finally:
        private.close()


def test_an_epoch_of_only_empty_poisson_batches_takes_its_noise_steps(teacher, public_keys,
                                                                      private_data,
                                                                      monkeypatch):
    """Poisson sampling can draw no example in every batch of an epoch: those are noise
    steps the ledger already counted, not a crash after the budget was recorded."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    def nothing(self):
        for _ in range(self.steps):
            yield []

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", nothing)
    student, obj = _dp_moma(teacher, public_keys)
    before = [q.detach().clone() for q in student.parameters()]
    loader = DataLoader(private_data, batch_size=6)
    result = train_local(student, obj, loader, TrainConfig(epochs=2, lr=0.1, seed=0),
                         privacy=DPConfig(noise_multiplier=1.0))
    assert result.metrics["steps"] == 2 * len(loader) == result.privacy.steps
    assert result.num_examples == 0 and result.privacy.epsilon > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
