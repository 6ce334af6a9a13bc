"""MoMA (``moma_attention = "reference"``) against the reference's equations, step by step.

The reference step (trinhvg/MoMA ``helper/loops_moma.py`` ``train_distill_moma`` with the MoCo
memory, ``head="mlp"``, ``attn="self"``, weights c = d = b = 1) is written out below with plain
tensor operations on copies of the same weights — none of moma_core's modules is called on the
reference side — and a few SGD steps (the queue wraps around) are compared with
:class:`moma_core.objectives.MoMA` driven the way the training loop drives it: every loss term,
every gradient, the momentum teacher, the key head, the queue and its pointer, to 1e-5.

A large teacher momentum step (m = 0.9) and a student that does not start from the teacher make
the order of the momentum update visible (teacher logits before it, keys after it).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moma_core.losses import kd_kl_loss
from moma_core.models import create_classifier, features_and_logits
from moma_core.objectives import MoMA, ObjectiveConfig

B, K, C, STEPS, TAU, T, M = 8, 20, 4, 5, 0.15, 4.0, 0.9


def _pooled(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EfficientNet: global average pool of the last feature map, then the linear classifier."""
    f = model.forward_features(x).mean(dim=(2, 3))
    return f, F.linear(f, model.classifier.weight, model.classifier.bias)


def _head(head: nn.Sequential, f: torch.Tensor) -> torch.Tensor:
    """Linear(d, d) → ReLU → Linear(d, 512) → L2 normalisation."""
    h = F.relu(F.linear(f, head[0].weight, head[0].bias))
    h = F.linear(h, head[2].weight, head[2].bias)
    return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _attention(attn: nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention whose tokens are the B samples: (1, B, D) → (1, B, D)."""
    b, d = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    out = []
    for h in range(heads):
        sl = slice(h * d // heads, (h + 1) * d // heads)
        a = torch.softmax(q[:, sl] @ k[:, sl].T / (d // heads) ** 0.5, dim=1)
        out.append(a @ v[:, sl])
    return F.linear(torch.cat(out, dim=1), attn.proj.weight, attn.proj.bias)


class Reference:
    """One process, no ShuffleBN, teacher in eval mode (the quirks the project does not copy)."""

    def __init__(self, obj: MoMA, student: nn.Module) -> None:
        self.student = copy.deepcopy(student)
        self.teacher = copy.deepcopy(obj.teacher).eval()
        self.embed_s, self.embed_t = copy.deepcopy(obj.proj_q), copy.deepcopy(obj.proj_k)
        self.atts_q, self.atts_k = copy.deepcopy(obj.attn_q), copy.deepcopy(obj.attn_k)
        self.atts_queue = copy.deepcopy(obj.attn_enqueue)
        self.memory = obj.queue.queue.clone()
        self.index = 0
        self.heads = obj.cfg.num_heads
        params = [*self.student.parameters(), *self.embed_s.parameters(),
                  *self.atts_q.parameters()]
        self.optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        feat_s, logit_s = _pooled(self.student, x)
        with torch.no_grad():
            _, logit_t = _pooled(self.teacher, x)  # before the momentum update
        loss_cls = F.cross_entropy(logit_s, y)
        p_t = torch.softmax(logit_t / T, dim=1)
        loss_div = (p_t * (p_t.log() - torch.log_softmax(logit_s / T, dim=1))).sum() / len(y)
        loss_div = loss_div * T * T
        with torch.no_grad():  # trainer.momentum_update(student, teacher) and of the heads
            for s, t in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
                t.mul_(M).add_(s, alpha=1 - M)
            for s, t in zip(self.embed_s.parameters(), self.embed_t.parameters(), strict=True):
                t.mul_(M).add_(s, alpha=1 - M)
            k_raw = _head(self.embed_t, _pooled(self.teacher, x)[0])
        q = _attention(self.atts_q, _head(self.embed_s, feat_s), self.heads)
        k = _attention(self.atts_k, k_raw, self.heads).detach()
        all_k = _attention(self.atts_queue, k_raw, self.heads)
        queue = self.memory.clone()
        out = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / TAU
        loss_kd = F.cross_entropy(out, torch.zeros(len(y), dtype=torch.long))
        with torch.no_grad():  # MoCo._update_memory, _update_pointer
            ids = (torch.arange(len(y)) + self.index) % K
            self.memory.index_copy_(0, ids, all_k)
            self.index = (self.index + len(y)) % K
        loss = loss_cls + loss_div + loss_kd
        self.optimizer.zero_grad()
        loss.backward()
        grads = _grads(self.student, self.embed_s, self.atts_q)
        self.optimizer.step()
        return {"ce": loss_cls, "kl": loss_div, "nce": loss_kd, "loss": loss, "grads": grads,
                "z_t": logit_t}


def _grads(*modules: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for m in modules for p in m.parameters()
            if p.grad is not None]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("key_head_init", ["independent", "copy"])
def test_moma_steps_match_the_reference_equations(key_head_init):
    torch.manual_seed(0)
    teacher = create_classifier("test_efficientnet", C, drop_rate=0.0).double()
    student = create_classifier("test_efficientnet", C, drop_rate=0.0).double()  # not a copy
    cfg = ObjectiveConfig(moma_attention="reference", queue_size=K, feat_dim=32, num_heads=4,
                          momentum=M,
                          nce_temperature=TAU, kd_temperature=T, key_head_init=key_head_init)
    obj = MoMA(teacher, student, cfg, same_task=True).double()  # float64: rounding out of sight
    ref = Reference(obj, student)
    student.train()
    obj.train()
    params = [*student.parameters(), *obj.trainable_parameters()]
    assert len(params) == len(list(ref.optimizer.param_groups[0]["params"]))
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    teacher_logits = []  # z_t as the objective's KL term receives them
    kl = obj._kl
    obj._kl = lambda z_s, z_t: (teacher_logits.append(z_t.detach().clone()), kl(z_s, z_t))[1]
    for step in range(STEPS):
        x = torch.randn(B, 3, 32, 32, generator=gen, dtype=torch.float64)
        y = torch.randint(0, C, (B,), generator=gen)
        expected = ref.step(x, y)
        loss, parts = obj.loss(student, x, y)
        optimizer.zero_grad()
        loss.backward()
        grads = _grads(student, obj.proj_q, obj.attn_q)
        optimizer.step()
        obj.after_step(student)

        # the teacher's logits themselves, not only the KL they give: the reference takes
        # them from the teacher before this step's momentum update
        torch.testing.assert_close(teacher_logits[step], expected["z_t"], atol=1e-12, rtol=0,
                                   msg=lambda m, s=step: f"step {s} teacher logits: {m}")
        for name in ("ce", "kl", "nce"):
            _close(parts[name], expected[name].detach(), f"step {step} {name}")
        _close(loss.detach(), expected["loss"].detach(), f"step {step} total")
        assert len(grads) == len(expected["grads"])
        for i, (g, e) in enumerate(zip(grads, expected["grads"], strict=True)):
            _close(g, e, f"step {step} gradient {i}")
        for a, b in zip(obj.teacher.parameters(), ref.teacher.parameters(), strict=True):
            _close(a, b, f"step {step} momentum teacher")
        for a, b in zip(obj.proj_k.parameters(), ref.embed_t.parameters(), strict=True):
            _close(a, b, f"step {step} key head")
        _close(obj.queue.queue, ref.memory, f"step {step} queue")
        assert int(obj.queue.queue_ptr) == ref.index
        assert float(parts["nce"]) > 0
    assert ref.index == (STEPS * B) % K and STEPS * B > K  # the queue wrapped around


def test_the_projection_head_sees_the_feature_before_dropout():
    """timm applies the classifier's dropout inside forward_head(pre_logits=True); g_s must not
    see it, while the logits still get it exactly as ``model(x)`` does."""
    torch.manual_seed(0)
    model = create_classifier("test_efficientnet", C, drop_rate=0.5).train()
    x = torch.randn(B, 3, 32, 32)
    f, z = features_and_logits(model, x)
    pooled = model.forward_features(x).mean(dim=(2, 3))  # BN in train mode: same batch stats
    _close(f, pooled, "pooled feature")
    assert float((f == 0).float().mean()) < 0.05
    torch.manual_seed(7)
    _, z1 = features_and_logits(model, x)
    torch.manual_seed(7)
    z2 = model(x)
    _close(z1, z2, "logits with dropout")
    assert not torch.allclose(z1, F.linear(pooled, model.classifier.weight,
                                           model.classifier.bias))
    assert model.drop_rate == 0.5  # restored


def test_keys_of_the_queue_are_the_raw_key_head_outputs_through_the_enqueue_attention():
    torch.manual_seed(0)
    teacher = create_classifier("test_efficientnet", C, drop_rate=0.0)
    student = copy.deepcopy(teacher)
    cfg = ObjectiveConfig(moma_attention="reference", queue_size=K, feat_dim=32)
    obj = MoMA(teacher, student, cfg, same_task=True)
    x, y = torch.randn(B, 3, 32, 32), torch.randint(0, C, (B,))
    loss, _ = obj.loss(student, x, y)
    loss.backward()
    obj.after_step(student)
    with torch.no_grad():
        k_raw = obj.proj_k(features_and_logits(obj.teacher.eval(), x)[0])
        _close(obj.queue.queue[:B], obj.attn_enqueue(k_raw), "enqueued keys")
        assert not torch.allclose(obj.queue.queue[:B], obj.attn_enqueue(obj.attn_k(k_raw)),
                                  atol=1e-4)


def test_queue_keys_option_enqueues_the_positive_keys_themselves():
    torch.manual_seed(0)
    teacher = create_classifier("test_efficientnet", C, drop_rate=0.0)
    student = copy.deepcopy(teacher)
    cfg = ObjectiveConfig(moma_attention="reference", queue_size=K, feat_dim=32,
                          queue_keys="keys")
    obj = MoMA(teacher, student, cfg, same_task=True)
    x, y = torch.randn(B, 3, 32, 32), torch.randint(0, C, (B,))
    loss, _ = obj.loss(student, x, y)
    loss.backward()
    obj.after_step(student)
    with torch.no_grad():
        k = obj.attn_k(obj.proj_k(features_and_logits(obj.teacher.eval(), x)[0]))
    _close(obj.queue.queue[:B], k, "enqueued keys")


def test_kl_after_update_takes_the_updated_teachers_logits_in_one_forward():
    torch.manual_seed(0)
    teacher = create_classifier("test_efficientnet", C, drop_rate=0.0).double()
    student = create_classifier("test_efficientnet", C, drop_rate=0.0).double()
    x, y = torch.randn(B, 3, 32, 32, dtype=torch.float64), torch.randint(0, C, (B,))
    kls = {}
    for mode in ("before-update", "after-update"):
        cfg = ObjectiveConfig(moma_attention="reference", queue_size=K, feat_dim=32,
                              momentum=M, kl_teacher=mode)
        obj = MoMA(teacher, student, cfg, same_task=True).double()
        before = obj.teacher(x).detach() if mode == "before-update" else None
        _, parts = obj.loss(student, x, y)
        z_t = before if before is not None else obj.teacher(x).detach()  # teacher now updated
        _close(parts["kl"], kd_kl_loss(student(x).detach(), z_t, T), f"kl {mode}")
        kls[mode] = float(parts["kl"])
    assert kls["before-update"] != kls["after-update"]
