"""Objective scenarios: same task vs different task, momentum vs frozen, attention keys."""

import pytest
import torch

from moma_core.models import create_classifier
from moma_core.objectives import (
    MoMA,
    ObjectiveConfig,
    VanillaKD,
    build_objective,
    init_student_from_teacher,
)

SMALL = dict(queue_size=64, feat_dim=32)


def _pair(teacher_classes=4, student_classes=4, teacher="test_efficientnet",
          student="test_efficientnet"):
    torch.manual_seed(0)
    return (create_classifier(teacher, teacher_classes),
            create_classifier(student, student_classes))


def _step(obj, student, n_classes, batch=8):
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, n_classes, (batch,))
    loss, parts = obj.loss(student, x, y)
    loss.backward()
    obj.after_step(student)
    return parts


def test_same_task_uses_kl_and_teacher_follows_student():
    teacher, student = _pair()
    obj = build_objective(ObjectiveConfig(**SMALL), student, teacher)
    assert isinstance(obj, MoMA) and obj.same_task
    head0 = obj.teacher.get_classifier().weight.detach().clone()
    with torch.no_grad():
        student.get_classifier().weight.add_(1.0)
    parts = _step(obj, student, 4)
    assert parts["kl"] > 0
    new_head = obj.teacher.get_classifier().weight
    expected = 0.999 * head0 + 0.001 * student.get_classifier().weight
    assert torch.allclose(new_head, expected, atol=1e-6)


def test_different_task_turns_kl_off_and_keeps_teacher_head():
    teacher, student = _pair(teacher_classes=4, student_classes=3)
    obj = build_objective(ObjectiveConfig(**SMALL), student, teacher)
    assert not obj.same_task
    head0 = obj.teacher.get_classifier().weight.detach().clone()
    stem0 = obj.teacher.conv_stem.weight.detach().clone()
    with torch.no_grad():
        student.conv_stem.weight.add_(1.0)
    parts = _step(obj, student, 3)
    assert float(parts["kl"]) == 0.0
    assert torch.equal(obj.teacher.get_classifier().weight, head0)
    assert not torch.equal(obj.teacher.conv_stem.weight, stem0)  # backbone still follows


def test_kd_refuses_a_teacher_of_another_task():
    teacher, student = _pair(4, 3)
    with pytest.raises(ValueError, match="same task"):
        build_objective(ObjectiveConfig(kind="kd"), student, teacher)
    teacher, student = _pair(4, 4)
    assert isinstance(build_objective(ObjectiveConfig(kind="kd"), student, teacher), VanillaKD)


def test_ce_needs_no_teacher_and_moma_does():
    _, student = _pair()
    obj = build_objective(ObjectiveConfig(kind="ce"), student)
    parts = _step(obj, student, 4)
    assert set(parts) == {"ce"}
    with pytest.raises(ValueError, match="needs a teacher"):
        build_objective(ObjectiveConfig(kind="moma"), student)


def test_momentum_needs_same_architecture_frozen_does_not():
    teacher, student = _pair(teacher="test_resnet")
    with pytest.raises(ValueError, match="frozen"):
        build_objective(ObjectiveConfig(**SMALL), student, teacher)
    obj = build_objective(ObjectiveConfig(teacher_update="frozen", **SMALL), student, teacher)
    before = [p.detach().clone() for p in obj.teacher.parameters()]
    _step(obj, student, 4)
    assert all(torch.equal(a, b) for a, b in zip(before, obj.teacher.parameters(), strict=True))


@pytest.mark.parametrize("teacher", ["mobilenetv3_small_100", "resnet10t"])
@pytest.mark.parametrize("kind", ["moma", "dp-moma"])
def test_a_frozen_larger_teacher_with_a_hidden_head_layer_distils(teacher, kind):
    """MobileNetV3's classifier reads 1024 features, its backbone gives 576: the key head must
    take what the teacher's pre-logits are (feature_dim), or the first step fails."""
    from moma_core.models import feature_dim, features_and_logits
    from moma_core.privacy.dp_moma import public_queue

    t, student = _pair(teacher=teacher)
    x = torch.randn(4, 3, 32, 32)
    assert features_and_logits(t.eval(), x)[0].shape[1] == feature_dim(t)
    cfg = ObjectiveConfig(kind=kind, teacher_update="frozen", **SMALL)
    keys = public_queue(t, torch.randn(8, 3, 32, 32)) if kind == "dp-moma" else None
    obj = build_objective(cfg, student, t, same_task=True, public_keys=keys)
    parts = _step(obj, student, 4)
    assert parts["nce"] > 0 and parts["kl"] > 0


@pytest.mark.parametrize("mode,key_grads", [("reference", False), ("trained", True)])
def test_attention_keys_option(mode, key_grads):
    teacher, student = _pair()
    obj = build_objective(ObjectiveConfig(attention_keys=mode, moma_attention="reference",
                                          **SMALL), student, teacher)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    loss, _ = obj.loss(student, x, y)
    loss.backward()
    assert obj.attn_q.qkv.weight.grad is not None
    assert (obj.attn_k.qkv.weight.grad is not None) == key_grads
    trainable = {id(p) for p in obj.trainable_parameters()}
    assert (id(obj.attn_k.qkv.weight) in trainable) == key_grads
    assert id(obj.proj_q[0].weight) in trainable
    assert id(obj.proj_k[0].weight) not in trainable  # key head moves by momentum only


def test_keys_are_enqueued_after_the_step():
    teacher, student = _pair()
    obj = build_objective(ObjectiveConfig(**SMALL), student, teacher)
    _step(obj, student, 4, batch=8)
    assert int(obj.queue.queue_ptr) == 8


@pytest.mark.parametrize("update", ["momentum", "frozen"])
def test_a_step_under_mixed_precision_autocast(update):
    """The CUDA AMP path (``TrainConfig.amp``) computes keys in half precision inside autocast
    and enqueues them outside it; CPU bfloat16 autocast exercises the same dtype mixing."""
    teacher, student = _pair()
    obj = build_objective(ObjectiveConfig(**SMALL, teacher_update=update), student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = obj.loss(student, torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))
    assert obj._pending_keys.dtype == torch.float32
    loss.backward()
    obj.after_step(student)
    assert torch.isfinite(loss) and parts["kl"] > 0 and parts["nce"] > 0
    assert int(obj.queue.queue_ptr) == 8 and obj.queue.queue.dtype == torch.float32
    assert torch.isfinite(obj.queue.queue).all()


def test_student_starts_from_teacher_backbone():
    teacher, student = _pair(4, 3)
    copied = init_student_from_teacher(student, teacher)
    assert copied == len(teacher.state_dict()) - 2  # all but the classifier weight and bias
    assert torch.equal(student.conv_stem.weight, teacher.conv_stem.weight)
    assert student.get_classifier().weight.shape[0] == 3  # fresh head of the target task


def test_objective_config_validates():
    with pytest.raises(ValueError):
        ObjectiveConfig(kind="crd")
    with pytest.raises(ValueError):
        ObjectiveConfig(attention_keys="random")
    cfg = ObjectiveConfig(queue_size=10)
    assert ObjectiveConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg


def test_a_teacher_of_another_task_with_as_many_classes_keeps_its_head_to_itself():
    """Same class count, other class names: the backbone is copied, the head is not (the
    teacher's class k is not the student's class k)."""
    teacher, student = _pair(4, 4)
    fresh = student.get_classifier().weight.detach().clone()
    copied = init_student_from_teacher(student, teacher, classifier=False)
    assert copied == len(teacher.state_dict()) - 2
    assert torch.equal(student.get_classifier().weight, fresh)
    assert torch.equal(student.conv_stem.weight, teacher.conv_stem.weight)
    assert init_student_from_teacher(student, teacher) == len(teacher.state_dict())
    assert torch.equal(student.get_classifier().weight, teacher.get_classifier().weight)
