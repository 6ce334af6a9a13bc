"""CRCKD as an objective: its pieces against small hand-computed cases, then a tiny timm run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from moma_core.crckd import (
    CRCKD,
    bank_update,
    class_centroids,
    crd_nce_loss,
    ema_alpha,
    first_occurrences,
    random_flip_rot90,
    relation_kl,
    sample_contrast_rows,
    sigmoid_rampup,
)
from moma_core.data.indexed import WithIndex
from moma_core.models import create_classifier


class Tiny(nn.Module):
    """A stand-in classifier with the timm methods the objectives use: feature = x·scale."""

    def __init__(self, d: int = 2, c: int = 3) -> None:
        super().__init__()
        self.num_features = d
        self.scale = nn.Parameter(torch.ones(d))
        self.fc = nn.Linear(d, c)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return f if pre_logits else self.fc(f)

    def get_classifier(self) -> nn.Module:
        return self.fc


def _tiny_objective(n_data: int = 4, c: int = 3, **kw) -> tuple[CRCKD, Tiny]:
    """Teacher = student = Tiny with scale 1 and identity heads: u = v = normalise(x)."""
    torch.manual_seed(0)
    student = Tiny(2, c)
    obj = CRCKD(Tiny(2, c), student, n_data, feat_dim=2, **kw)
    with torch.no_grad():
        obj.teacher.load_state_dict(student.state_dict())
        for head in (obj.embed_s, obj.embed_t):
            head[0].weight.copy_(torch.eye(2))
            head[0].bias.zero_()
    return obj, student


def _timm_pair(n_classes: int = 3, teacher: str = "test_efficientnet"):
    torch.manual_seed(0)
    return (create_classifier(teacher, n_classes),
            create_classifier("test_efficientnet", n_classes))


# (1) bank row update --------------------------------------------------------------------------

def test_bank_update_formula_on_known_rows():
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
    before = bank.clone()
    bank_update(bank, torch.tensor([0, 1]), torch.tensor([[0.0, 1.0], [0.8, -0.6]]), 0.5)
    r = 1 / math.sqrt(2)
    # row 0: 0.5·(1,0) + 0.5·(0,1) = (0.5, 0.5) → (1/√2, 1/√2)
    assert torch.allclose(bank[0], torch.tensor([r, r]))
    # row 1: 0.5·(0.6,0.8) + 0.5·(0.8,−0.6) = (0.7, 0.1), norm √0.5
    assert torch.allclose(bank[1], torch.tensor([0.7, 0.1]) / math.sqrt(0.5))
    assert torch.equal(bank[2], before[2])


def test_first_occurrences_writes_a_repeated_sample_once():
    assert first_occurrences(torch.tensor([5, 2, 5, 7, 2])).tolist() == [1, 0, 3]
    obj, student = _tiny_objective(n_data=4)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    row0 = obj.bank_s[1].clone()
    obj.loss(student, x, torch.tensor([0, 0]), index=torch.tensor([1, 1]))
    obj.after_step(student)
    expected = F.normalize(0.5 * row0 + 0.5 * torch.tensor([1.0, 0.0]), dim=0)
    assert torch.allclose(obj.bank_s[1], expected)  # from the first occurrence only


# (2) CRP ----------------------------------------------------------------------------------------

def test_class_centroids_and_relation_kl_by_hand():
    # student bank: class 0 rows (1,0), (0.6,0.8); class 1 rows (0,1), (−0.6,0.8); row 4 unwritten
    bank_s = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8], [5.0, 5.0]])
    bank_t = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [-5.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1, -1])
    cs, present = class_centroids(bank_s, labels, num_classes=3)
    ct, _ = class_centroids(bank_t, labels, num_classes=3)
    assert present.tolist() == [True, True, False]
    # means (0.8, 0.4) and (−0.3, 0.9), normalised by hand
    c0 = torch.tensor([0.8, 0.4]) / math.sqrt(0.8)
    c1 = torch.tensor([-0.3, 0.9]) / math.sqrt(0.9)
    assert torch.allclose(cs[0], c0) and torch.allclose(cs[1], c1)
    t0 = torch.tensor([0.5, 0.5]) / math.sqrt(0.5)
    t1 = torch.tensor([0.9, 0.3]) / math.sqrt(0.9)
    assert torch.allclose(ct[0], t0) and torch.allclose(ct[1], t1)

    tau = 0.5
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])
    # relations by hand over the two present classes: softmax of dot products / τ
    expected = 0.0
    for i in range(2):
        ls = [float(u[i] @ c0) / tau, float(u[i] @ c1) / tau]
        lt = [float(v[i] @ t0) / tau, float(v[i] @ t1) / tau]
        rs = [math.exp(a) / sum(math.exp(b) for b in ls) for a in ls]
        rt = [math.exp(a) / sum(math.exp(b) for b in lt) for a in lt]
        expected += sum(p * math.log(p / q) for p, q in zip(rt, rs, strict=True)) / 2
    got = relation_kl(u, cs, v, ct, present, tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0.01


def test_centroid_relu_is_the_reference_variant():
    bank = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    c, _ = class_centroids(bank, torch.tensor([0, 0]), 1, relu=True)
    assert torch.allclose(c[0], torch.tensor([0.5, 0.5]) / math.sqrt(0.5))
    c, _ = class_centroids(bank, torch.tensor([0, 0]), 1, relu=False)
    assert torch.allclose(c[0], torch.tensor([1.0, 0.0]))  # mean (0.5, 0)


def test_crp_is_zero_without_written_rows_or_with_one_class():
    u = torch.randn(3, 2)
    _, none = class_centroids(torch.randn(4, 2), torch.full((4,), -1), 2)
    assert relation_kl(u, torch.zeros(2, 2), u, torch.zeros(2, 2), none, 0.07).item() == 0.0
    c, one = class_centroids(torch.randn(4, 2), torch.tensor([1, -1, 1, -1]), 2)
    assert relation_kl(u, c, u.flip(1), c, one, 0.07).item() == pytest.approx(0.0, abs=1e-7)


# (3) CCD ----------------------------------------------------------------------------------------

def _hand_nce(logits: list[list[float]], num_pos: int, z: float, k_over_n: float) -> float:
    total = 0.0
    for row in logits:
        xs = [math.exp(a) / z for a in row]
        pos = sum(math.log(x / (x + k_over_n)) for x in xs[:num_pos]) / num_pos
        neg = sum(math.log(k_over_n / (x + k_over_n)) for x in xs[num_pos:])
        total += pos + neg
    return -total / len(logits)


def test_contrast_rows_use_written_rows_only_and_cap_negatives():
    labels = torch.tensor([0, 1, -1, -1])
    index, y = torch.tensor([0, 2, 3]), torch.tensor([0, 1, 2])
    rows, valid, k = sample_contrast_rows(index, y, labels, num_pos=2, num_neg=4096)
    assert k == 1  # one written row of another class for each class: K capped at 1
    assert valid.tolist() == [True, True, False]  # class 2 has no written row
    assert rows[0].tolist() == [0, 0, 1]  # own row first, the only class-0 row, negative 1
    assert rows[1].tolist() == [1, 1, 0]  # own row unwritten: both positives drawn from {1}
    _, none, k0 = sample_contrast_rows(index, y, torch.full((4,), -1), 2, 8)
    assert k0 == 0 and not none.any()


def test_sampled_rows_respect_classes():
    torch.manual_seed(1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, -1, 2])
    index, y = torch.tensor([0, 6, 2]), torch.tensor([0, 2, 1])
    rows, valid, k = sample_contrast_rows(index, y, labels, num_pos=3, num_neg=50)
    assert valid.all() and k == 4  # fewest other-class rows: class 1 sees 2 + 2 written rows
    for r, c in zip(rows, y.tolist(), strict=True):
        assert (labels[r[:3]] == c).all() and (labels[r[3:]] != c).all()
        assert (labels[r] >= 0).all()
    for seed in range(5):  # a written anchor's own row is always its first positive
        torch.manual_seed(seed)
        rows, _, _ = sample_contrast_rows(index, y, labels, num_pos=3, num_neg=50)
        assert rows[0, 0] == 0 and rows[2, 0] == 2


def test_crd_nce_formula():
    logits = torch.tensor([[1.2, 0.3, 1.6, -0.4], [0.0, 0.5, 2.0, 1.0]])
    got = crd_nce_loss(logits, num_pos=2, log_z=math.log(3.0), n_data=10)
    expected = _hand_nce(logits.tolist(), 2, 3.0, 2 / 10)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_objective_ccd_and_crp_on_a_hand_set_bank():
    obj, student = _tiny_objective(n_data=4, c=3, nce_p=2, nce_k=4096, nce_t=0.5, crp_t=0.25)
    with torch.no_grad():
        obj.bank_t[:2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        obj.bank_s[:2] = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
        obj.bank_labels[:] = torch.tensor([0, 1, -1, -1])
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # u = v = (.6,.8), (1,0), (0,1)
    y, index = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3])
    total, parts = obj.loss(student, x, y, index=index)
    # anchors 0 and 1 contrast (rows [0,0 | 1] and [1,1 | 0]); anchor 2 (class 2) does not
    ls = [[0.6 / 0.5, 0.6 / 0.5, 0.8 / 0.5], [0.0, 0.0, 1.0 / 0.5]]  # u·M_t / τ
    lt = [[1.0 / 0.5, 1.0 / 0.5, 0.0], [0.8 / 0.5, 0.8 / 0.5, 0.6 / 0.5]]  # v·M_s / τ
    z_s = 4 * sum(math.exp(a) for r in ls for a in r) / 6  # Z = N·mean(exp) of the 1st batch
    z_t = 4 * sum(math.exp(a) for r in lt for a in r) / 6
    assert obj.log_z.tolist() == pytest.approx([math.log(z_s), math.log(z_t)], rel=1e-6)
    ccd = _hand_nce(ls, 2, z_s, 1 / 4) + _hand_nce(lt, 2, z_t, 1 / 4)
    assert parts["ccd"].item() == pytest.approx(ccd, rel=1e-5)
    # CRP over classes 0 and 1; centroids are the single rows; all three anchors count
    cs = [(0.6, 0.8), (0.8, -0.6)]
    ct = [(1.0, 0.0), (0.0, 1.0)]
    e = [(0.6, 0.8), (1.0, 0.0), (0.0, 1.0)]
    crp = 0.0
    for a in e:
        s = [math.exp((a[0] * c[0] + a[1] * c[1]) / 0.25) for c in cs]
        t = [math.exp((a[0] * c[0] + a[1] * c[1]) / 0.25) for c in ct]
        rs, rt = [q / sum(s) for q in s], [p / sum(t) for p in t]
        crp += sum(p * math.log(p / q) for p, q in zip(rt, rs, strict=True)) / 3
    assert parts["crp"].item() == pytest.approx(crp, rel=1e-5)
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-7)  # teacher = student here
    expected_total = parts["ce"] + 0.1 * parts["ccd"] + parts["crp"]
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-6)
    z = obj.log_z.clone()  # Z is set once (CRD): another batch leaves it alone
    obj.loss(student, -x, y, index=index)
    assert torch.equal(obj.log_z, z)


def test_ccd_is_zero_on_an_empty_bank_and_log_z_stays_unset():
    obj, student = _tiny_objective(n_data=4)
    _, parts = obj.loss(student, torch.randn(2, 2), torch.tensor([0, 1]),
                        index=torch.tensor([0, 1]))
    assert parts["ccd"].item() == 0.0 and parts["crp"].item() == 0.0
    assert torch.isnan(obj.log_z).all()


# (4) EMA schedule and consistency ramp ---------------------------------------------------------

def test_ema_alpha_schedule():
    assert [ema_alpha(s) for s in (0, 1, 9, 1000)] == pytest.approx([0.0, 0.5, 0.9, 0.99])
    assert ema_alpha(0, 0.99, warmup=False) == 0.99


def test_mean_teacher_follows_student_with_the_schedule():
    obj, student = _tiny_objective()
    with torch.no_grad():
        student.scale.fill_(3.0)
        obj.embed_s[0].bias.fill_(2.0)
    obj.after_step(student)  # step 0: α = 0, the teacher becomes the student
    assert torch.allclose(obj.teacher.scale, torch.full((2,), 3.0))
    assert torch.allclose(obj.embed_t[0].bias, torch.full((2,), 2.0))
    with torch.no_grad():
        student.scale.fill_(5.0)
    obj.after_step(student)  # step 1: α = 0.5
    assert torch.allclose(obj.teacher.scale, torch.full((2,), 4.0))
    assert int(obj.step) == 2

    keep, s2 = _tiny_objective(ema_warmup=False)
    with torch.no_grad():
        s2.scale.fill_(3.0)
    keep.after_step(s2)  # α = 0.99 from the start: 0.99·1 + 0.01·3
    assert torch.allclose(keep.teacher.scale, torch.full((2,), 1.02))


def test_ema_buffers_option_lets_teacher_statistics_follow():
    torch.manual_seed(0)
    nets = [Tiny(), Tiny()]
    for net in nets:
        net.register_buffer("running", torch.zeros(2))
        net.register_buffer("seen", torch.zeros((), dtype=torch.long))
    teacher, student = nets
    plain = CRCKD(teacher, student, n_data=4, feat_dim=2)
    follow = CRCKD(teacher, student, n_data=4, feat_dim=2, ema_buffers=True, ema_warmup=False,
                   ema_max=0.75)
    student.running.fill_(4.0)
    student.seen.fill_(7)
    plain.after_step(student)
    follow.after_step(student)
    assert torch.equal(plain.teacher.running, torch.zeros(2)) and int(plain.teacher.seen) == 0
    assert torch.allclose(follow.teacher.running, torch.full((2,), 1.0))  # 0.75·0 + 0.25·4
    assert int(follow.teacher.seen) == 7


def test_consistency_rampup():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(50, 10) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0
    obj, _ = _tiny_objective(rampup_steps=10, consistency_weight=2.0)
    assert obj.consistency_ramp() == pytest.approx(2 * math.exp(-5))


# (5) gradients ----------------------------------------------------------------------------------

def _prefilled(obj: CRCKD, n_classes: int) -> None:
    with torch.no_grad():
        obj.bank_labels[:] = torch.arange(obj.n_data) % n_classes


def test_teacher_gets_no_gradient_and_student_does():
    teacher, student = _timm_pair()
    obj = CRCKD(teacher, student, n_data=16, feat_dim=16, nce_k=8)
    _prefilled(obj, 3)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    total, parts = obj.loss(student, x, y, index=torch.arange(6))
    assert parts["ccd"] > 0 and parts["crp"] > 0
    total.backward()
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert all(p.grad is None for p in obj.embed_t.parameters())
    assert all(b.grad is None for b in obj.buffers())
    assert student.conv_stem.weight.grad is not None
    assert student.conv_stem.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.trainable_parameters())


def test_ccd_alone_trains_student_and_head():
    obj, student = _tiny_objective(n_data=8, ce_weight=0.0, consistency_weight=0.0,
                                   crp_weight=0.0, nce_p=1, nce_k=4)
    _prefilled(obj, 3)
    total, _ = obj.loss(student, torch.randn(4, 2), torch.tensor([0, 1, 2, 0]),
                        index=torch.tensor([0, 1, 2, 3]))
    total.backward()
    assert student.scale.grad is not None and student.scale.grad.abs().sum() > 0
    assert obj.embed_s[0].weight.grad.abs().sum() > 0
    assert obj.teacher.scale.grad is None


# (6) a few optimisation steps with a tiny timm model --------------------------------------------

def test_steps_run_finite_and_write_only_the_batch_rows():
    teacher, student = _timm_pair()
    n = 12
    obj = CRCKD(teacher, student, n_data=n, feat_dim=16, nce_p=2, nce_k=64, rampup_steps=5)
    torch.manual_seed(1)
    images, labels = torch.randn(n, 3, 32, 32), torch.arange(n) % 3
    params = list(student.parameters()) + list(obj.trainable_parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    student.train()
    obj.train()
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 4, 8, 5], [2, 6, 10, 11]]
    for step, idx in enumerate(batches * 2):
        index = torch.tensor(idx)
        before = (obj.bank_s.clone(), obj.bank_t.clone(), obj.bank_labels.clone())
        total, parts = obj.loss(student, images[index], labels[index], index=index)
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        obj.after_step(student)
        rest = torch.ones(n, dtype=torch.bool)
        rest[index] = False
        for new, old in zip((obj.bank_s, obj.bank_t, obj.bank_labels), before, strict=True):
            assert torch.equal(new[rest], old[rest])  # bit-identical outside the batch
        assert not torch.equal(obj.bank_s[index], before[0][index])
        assert not torch.equal(obj.bank_t[index], before[1][index])
        assert torch.equal(obj.bank_labels[index], labels[index])
        if step == 0:
            assert parts["ccd"] == 0 and parts["crp"] == 0  # nothing written yet
        else:  # every class has written rows from the second step on
            assert parts["ccd"] > 0 and parts["crp"] > 0
    assert int(obj.step) == 10
    assert torch.allclose(obj.bank_s.norm(dim=1), torch.ones(n), atol=1e-5)
    assert obj.training and not obj.teacher.training


def test_a_small_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    teacher = create_classifier("test_efficientnet", 3, drop_rate=0.0)
    student = create_classifier("test_efficientnet", 3, drop_rate=0.0)
    obj = CRCKD(teacher, student, n_data=12, feat_dim=16, nce_p=2, nce_k=6, rampup_steps=0)
    _prefilled(obj, 3)
    x, y, index = torch.randn(9, 3, 32, 32), torch.arange(9) % 3, torch.arange(9)
    opt = torch.optim.SGD(list(student.parameters()) + list(obj.trainable_parameters()),
                          lr=1e-3)

    def evaluate() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(7)  # the same contrast rows each time (banks unchanged in between)
        return obj.loss(student, x, y, index=index)

    losses = []
    for _ in range(3):
        total, parts = evaluate()
        assert parts["ccd"] > 0 and parts["crp"] > 0 and parts["kl"] > 0
        losses.append(total.item())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert losses[2] < losses[1] < losses[0]


def test_bank_first_write_copy_then_blend():
    obj, student = _tiny_objective(bank_first_write="copy")
    x = torch.tensor([[3.0, 4.0]])
    obj.loss(student, x, torch.tensor([0]), index=torch.tensor([1]))
    obj.after_step(student)
    assert torch.allclose(obj.bank_s[1], torch.tensor([0.6, 0.8]))  # g itself
    obj.loss(student, torch.tensor([[1.0, 0.0]]), torch.tensor([0]), index=torch.tensor([1]))
    obj.after_step(student)
    assert torch.allclose(obj.bank_s[1], torch.tensor([0.8, 0.4]) / math.sqrt(0.8))
    with pytest.raises(ValueError, match="bank_first_write"):
        _tiny_objective(bank_first_write="zero")


def test_loss_runs_in_half_precision_autocast_without_overflow():
    obj, student = _tiny_objective(n_data=8, nce_k=4)
    _prefilled(obj, 3)
    with torch.autocast("cpu", dtype=torch.float16):  # exp(1/0.07) is inf in float16
        total, parts = obj.loss(student, torch.randn(4, 2), torch.tensor([0, 1, 2, 0]),
                                index=torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(total) and parts["ccd"] > 0
    obj.after_step(student)
    assert obj.bank_s.dtype == torch.float32


# (7) index --------------------------------------------------------------------------------------

def test_loss_without_index_is_a_clear_error():
    obj, student = _tiny_objective()
    assert CRCKD.needs_index
    with pytest.raises(ValueError, match="WithIndex"):
        obj.loss(student, torch.randn(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside the memory bank"):
        obj.loss(student, torch.randn(2, 2), torch.tensor([0, 1]), index=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="2 indices for a batch of 3"):
        obj.loss(student, torch.randn(3, 2), torch.tensor([0, 1, 1]), index=torch.tensor([0, 1]))


def test_with_index_yields_positions_and_keeps_classes():
    base = TensorDataset(torch.arange(10.0).view(5, 2), torch.tensor([0, 1, 0, 1, 1]))
    base.classes = ["a", "b"]  # type: ignore[attr-defined]
    ds = WithIndex(base)
    assert len(ds) == 5 and ds.classes == ["a", "b"]
    x, y, i = ds[3]
    assert torch.equal(x, torch.tensor([6.0, 7.0])) and int(y) == 1 and i == 3
    assert ds[-1][2] == 4
    with pytest.raises(IndexError):
        ds[5]
    xb, yb, ib = next(iter(DataLoader(ds, batch_size=5, shuffle=True,
                                      generator=torch.Generator().manual_seed(0))))
    assert torch.equal(xb[:, 0], ib.float() * 2) and torch.equal(yb, base.tensors[1][ib])
    sub = WithIndex(Subset(base, [4, 2]))
    assert not hasattr(sub, "classes") and sub[1][2] == 1
    assert torch.equal(sub[1][0], torch.tensor([4.0, 5.0]))


# (8) architectures ------------------------------------------------------------------------------

def test_different_architecture_teacher_is_rejected():
    teacher, student = _timm_pair(teacher="test_resnet")
    with pytest.raises(ValueError, match="same architecture"):
        CRCKD(teacher, student, n_data=8)
    with pytest.raises(ValueError, match="same architecture"):
        CRCKD(Tiny(3, 3), Tiny(2, 3), n_data=8)


def test_teacher_of_another_task_follows_in_its_backbone_only_and_kl_is_off():
    torch.manual_seed(0)
    teacher, student = Tiny(2, 4), Tiny(2, 3)
    obj = CRCKD(teacher, student, n_data=4, feat_dim=2, same_task=False)
    head = obj.teacher.fc.weight.clone()
    _, parts = obj.loss(student, torch.randn(2, 2), torch.tensor([0, 2]),
                        index=torch.tensor([0, 1]))
    assert parts["kl"].item() == 0.0
    with torch.no_grad():
        student.scale.fill_(2.0)
    obj.after_step(student)
    assert torch.equal(obj.teacher.fc.weight, head)
    assert torch.allclose(obj.teacher.scale, torch.full((2,), 2.0))


# (9) state ---------------------------------------------------------------------------------------

def test_state_dict_round_trip_keeps_banks_labels_step_and_normaliser():
    obj, student = _tiny_objective(n_data=6, nce_k=4)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    for idx in ([0, 1, 2], [3, 4, 5], [0, 2, 4]):
        index = torch.tensor(idx)
        obj.loss(student, x[index], y[index], index=index)
        obj.after_step(student)
    assert not torch.isnan(obj.log_z).any()
    state = obj.state_dict()
    assert {"bank_s", "bank_t", "bank_labels", "step", "log_z"} <= set(state)
    torch.manual_seed(123)
    fresh = CRCKD(Tiny(2, 3), Tiny(2, 3), n_data=6, feat_dim=2, nce_k=4)
    assert not torch.equal(fresh.bank_s, obj.bank_s)
    fresh.load_state_dict(state)
    for name in ("bank_s", "bank_t", "bank_labels", "log_z"):
        assert torch.equal(getattr(fresh, name), getattr(obj, name))
    assert int(fresh.step) == 3
    assert torch.equal(fresh.teacher.scale, obj.teacher.scale)


# options ------------------------------------------------------------------------------------------

def test_second_view_feeds_the_teacher():
    obj, student = _tiny_objective(second_view=lambda x: -x)
    x = torch.tensor([[3.0, 4.0]])
    row_t, row_s = obj.bank_t[2].clone(), obj.bank_s[2].clone()
    obj.loss(student, x, torch.tensor([1]), index=torch.tensor([2]))
    obj.after_step(student)
    e = torch.tensor([0.6, 0.8])
    assert torch.allclose(obj.bank_t[2], F.normalize(0.5 * row_t - 0.5 * e, dim=0))
    assert torch.allclose(obj.bank_s[2], F.normalize(0.5 * row_s + 0.5 * e, dim=0))


def test_class_weighted_cross_entropy():
    w = torch.tensor([1.0, 3.0, 0.5])
    obj, student = _tiny_objective(class_weights=w)
    x, y = torch.tensor([[1.0, 2.0], [0.5, -1.0]]), torch.tensor([1, 2])
    _, parts = obj.loss(student, x, y, index=torch.tensor([0, 1]))
    logp = torch.log_softmax(student.fc(x), dim=1).detach()
    expected = -(3.0 * logp[0, 1] + 0.5 * logp[1, 2]) / (3.0 + 0.5)
    assert parts["ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="class_weights"):
        _tiny_objective(class_weights=torch.ones(2))


def test_random_flip_rot90_is_a_dihedral_map_per_image():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    out = random_flip_rot90(x)
    for a, b in zip(x, out, strict=True):
        views = [torch.rot90(v, r, dims=(-2, -1)) for v in (a, a.flip(-1)) for r in range(4)]
        assert any(torch.equal(b, v) for v in views)
    with pytest.raises(ValueError, match="square"):
        random_flip_rot90(torch.randn(1, 3, 4, 5))
