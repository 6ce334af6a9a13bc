"""MoMA's residual attention (``moma_attention = "residual"``) and the NCE term's health figures.

The residual variant: q = normalize(x + A_q(x)) with A_q's output projection starting at 0,
k = normalize(k̂ + A_k(k̂)) with A_k the momentum copy of A_q, the queue receiving k itself with
each key's image index (a query's own image is never its negative), K ≤ n − B. The health
figures (``nce-shuffled``, ``retrieval``) make a term that carries no per-image knowledge
visible; on a small fixed problem the residual term must carry it and the reference's must be
caught not carrying it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from moma_core.models import create_classifier, features_and_logits
from moma_core.objectives import (
    MoMA,
    ObjectiveConfig,
    build_objective,
    nce_health,
    queue_size_for,
    training_set,
)
from moma_core.queue import KeyQueue
from moma_core.sources import make_loader, open_site_data
from moma_core.train import TrainConfig, train_local

B, C = 8, 4
RESIDUAL = dict(moma_attention="residual", queue_size=64, feat_dim=32, momentum=0.9)


def _pair(same=True):
    torch.manual_seed(0)
    teacher = create_classifier("test_efficientnet", C, drop_rate=0.0)
    student = copy.deepcopy(teacher) if same else create_classifier("test_efficientnet", C,
                                                                     drop_rate=0.0)
    return teacher, student


def test_residual_query_starts_as_the_plain_contrast():
    teacher, student = _pair()
    obj = build_objective(ObjectiveConfig(**RESIDUAL), student, teacher, same_task=True)
    assert isinstance(obj, MoMA) and obj.residual and obj.needs_index
    assert not hasattr(obj, "attn_enqueue")  # no third map
    assert float(obj.attn_q.proj.weight.detach().abs().sum()) == 0.0
    assert not any(p.requires_grad for p in obj.attn_k.parameters())
    x = torch.randn(B, 3, 32, 32)
    f_s = features_and_logits(student, x)[0]
    x_q = obj.proj_q(f_s)
    q = F.normalize(x_q + obj.attn_q(x_q), dim=1)
    torch.testing.assert_close(q, F.normalize(x_q, dim=1))
    trainable = {id(p) for p in obj.trainable_parameters()}
    assert all(id(p) in trainable for p in obj.attn_q.parameters())


def test_residual_step_moves_a_k_by_momentum_and_enqueues_exactly_k_with_its_images():
    teacher, student = _pair(same=False)
    cfg = ObjectiveConfig(**RESIDUAL, teacher_update="frozen")
    obj = build_objective(cfg, student, teacher, same_task=True)
    params = [*student.parameters(), *obj.trainable_parameters()]
    optimizer = torch.optim.SGD(params, lr=0.5)
    x, y = torch.randn(B, 3, 32, 32), torch.randint(0, C, (B,))
    index = torch.arange(10, 10 + B)
    a_k_before = copy.deepcopy(obj.attn_k)
    with torch.no_grad():
        k_raw = obj.proj_k(features_and_logits(obj.teacher, x)[0])
        k = F.normalize(k_raw + a_k_before(k_raw), dim=1)
    loss, parts = obj.loss(student, x, y, index=index)
    optimizer.zero_grad()
    loss.backward()
    assert obj.attn_q.proj.weight.grad is not None
    assert float(obj.attn_q.proj.weight.grad.abs().sum()) > 0  # the attention learns
    optimizer.step()
    obj.after_step(student)
    torch.testing.assert_close(obj.queue.queue[:B], k)
    assert obj.queue.queue_ids[:B].tolist() == index.tolist()
    assert (obj.queue.queue_ids[B:] == -1).all()
    for p_k, p_0, p_q in zip(obj.attn_k.parameters(), a_k_before.parameters(),
                             obj.attn_q.parameters(), strict=True):
        torch.testing.assert_close(p_k, 0.9 * p_0 + 0.1 * p_q)
    assert float(obj.attn_k.proj.weight.abs().sum()) > 0  # it followed A_q away from 0
    assert set(parts) >= {"ce", "kl", "nce", "nce-shuffled", "retrieval"}


def test_a_queued_key_of_the_querys_own_image_is_never_its_negative():
    torch.manual_seed(0)
    queue = KeyQueue(dim=16, size=12, temperature=0.5, track_ids=True)
    old = F.normalize(torch.randn(6, 16), dim=1)
    queue.enqueue(old, torch.tensor([3, 4, 5, 6, 7, 8]))
    q = F.normalize(torch.randn(4, 16), dim=1)
    logits, _ = queue.logits(q, q, torch.tensor([5, 9, 3, 8]))
    neg = logits[:, 1:]
    assert torch.isinf(neg[0, 2]) and torch.isinf(neg[2, 0]) and torch.isinf(neg[3, 5])
    assert torch.isinf(neg).sum() == 3  # image 9 has no earlier key; the start (−1) is kept
    plain, _ = KeyQueue(dim=16, size=12, temperature=0.5).logits(q, q)
    assert not torch.isinf(plain).any()
    # without the mask (a queue that does not track images) the same key would be a negative
    untracked = KeyQueue(dim=16, size=12, temperature=0.5)
    untracked.enqueue(old)
    assert not torch.isinf(untracked.logits(q, q, torch.tensor([5, 9, 3, 8]))[0]).any()


def test_a_batch_larger_than_the_queue_keeps_its_last_keys_where_they_land():
    queue = KeyQueue(dim=4, size=3, track_ids=True)
    keys = F.normalize(torch.randn(5, 4), dim=1)
    queue.enqueue(keys[:1], torch.tensor([0]))  # pointer at 1
    # written one by one from position 1 the keys would land at 1, 2, 0, 1, 2: the last
    # three stay, keys 2, 3, 4 at positions 0, 1, 2
    queue.enqueue(keys, torch.arange(10, 15))
    assert queue.queue_ids.tolist() == [12, 13, 14]
    torch.testing.assert_close(queue.queue, keys[2:])
    assert int(queue.queue_ptr) == (1 + 5) % 3


def test_queue_size_is_at_most_the_sites_images_less_a_batch():
    assert queue_size_for(4096, 800, 32) == 768
    assert queue_size_for(256, 800, 32) == 256
    assert queue_size_for(4096, None, None) == 4096
    with pytest.raises(ValueError, match="more training images than one batch"):
        queue_size_for(4096, 32, 32)
    teacher, student = _pair()
    obj = build_objective(ObjectiveConfig(**{**RESIDUAL, "queue_size": 4096}), student,
                          teacher, same_task=True, n_data=100, batch_size=16)
    assert obj.queue.size == 84
    ref = build_objective(ObjectiveConfig(queue_size=4096, feat_dim=32,
                                          moma_attention="reference"), student, teacher,
                          same_task=True, n_data=100, batch_size=16)
    assert ref.queue.size == 4096  # the reference attention keeps the given K


def test_residual_refuses_a_trained_reference_key_attention():
    with pytest.raises(ValueError, match="momentum copy"):
        ObjectiveConfig(moma_attention="residual", attention_keys="trained")
    with pytest.raises(ValueError, match="moma_attention"):
        ObjectiveConfig(moma_attention="sideways")


def test_nce_health_figures():
    k = torch.eye(4, 8)
    logits = torch.cat([torch.ones(4, 1), torch.zeros(4, 3)], dim=1) / 0.5
    h = nce_health(logits, k.clone(), k, 0.5)
    assert float(h["retrieval"]) == 1.0
    nce = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert float(h["nce-shuffled"]) > float(nce) + 1.0  # a shuffled positive is worth less
    same = torch.ones(4, 8) / math.sqrt(8)  # every query and key the same vector
    h = nce_health(torch.ones(4, 4) / 0.5, same, same, 0.5)
    assert float(h["nce-shuffled"]) == pytest.approx(float(F.cross_entropy(
        torch.ones(4, 4) / 0.5, torch.zeros(4, dtype=torch.long))))
    assert nce_health(logits[:1], k[:1], k[:1], 0.5) == {}


# -- the term on a small fixed problem ---------------------------------------------------------
@pytest.fixture(scope="module")
def trained_teacher():
    """A teacher of the source task (5 epochs on 600 synthetic images, 32 px: a few seconds)."""
    src = open_site_data("synthetic:source", image_size=32, augment="flip", seed=1, n=600)
    torch.manual_seed(0)
    teacher = create_classifier("test_efficientnet", len(src.classes))
    ce = build_objective(ObjectiveConfig(kind="ce"), teacher)
    train_local(teacher, ce, make_loader(src.train, 32, train=True, seed=0),
                TrainConfig(epochs=5, lr=0.003, optimizer="adamw", seed=0))
    return teacher.eval()


def _distil(teacher, mode: str, epochs: int = 12) -> list[dict]:
    data = open_site_data("synthetic:target", image_size=32, augment="flip", seed=0, n=160)
    torch.manual_seed(0)
    student = create_classifier("test_efficientnet", len(data.classes))
    cfg = ObjectiveConfig(moma_attention=mode, teacher_update="frozen", queue_size=256,
                          feat_dim=64)
    obj = build_objective(cfg, student, teacher, same_task=False, n_data=len(data.train),
                          batch_size=16)
    loader = make_loader(training_set(obj, data.train), 16, train=True, seed=0)
    result = train_local(student, obj, loader,
                         TrainConfig(epochs=epochs, lr=0.003, optimizer="adamw", seed=0))
    return result.history


def _carries_per_image_knowledge(history: list[dict], batch: int = 16) -> list[str]:
    """What is wrong with the term over the last epochs (empty: alive and per-image)."""
    last = history[-3:]
    nce = sum(h["nce"] for h in last) / len(last)
    gap = sum(h["nce-shuffled"] - h["nce"] for h in last) / len(last)
    retrieval = sum(h["retrieval"] for h in last) / len(last)
    problems = []
    if nce < 0.1:
        problems.append(f"NCE {nce:.4f}: the term is (close to) 0, it gives no gradient")
    if gap < 0.5:
        problems.append(f"shuffling the positives costs {gap:.3f} nats: no per-image signal")
    if retrieval < 2.0 / batch:
        problems.append(f"in-batch retrieval {retrieval:.3f}: chance is {1 / batch:.3f}")
    return problems


def test_the_residual_term_carries_per_image_teacher_knowledge(trained_teacher):
    history = _distil(trained_teacher, "residual")
    assert _carries_per_image_knowledge(history) == []
    assert history[-1]["nce"] < math.log(256 + 1)  # below chance too


def test_the_health_check_catches_the_reference_terms_shortcut(trained_teacher):
    """The same check on the reference attention (negative control): its term falls to 0 and
    loses nothing when its positives are shuffled."""
    problems = _carries_per_image_knowledge(_distil(trained_teacher, "reference"))
    assert any("close to) 0" in p for p in problems)
    assert any("no per-image signal" in p for p in problems)


def test_a_smaller_queue_is_said_once_per_process_not_every_round(caplog):
    """A site (or a baseline) builds its objective every round: the queue's size is logged
    the first time only, and again for other settings."""
    import logging

    from moma_core.objectives import moma

    moma._QUEUE_SIZES_SAID.clear()
    with caplog.at_level(logging.INFO, logger="moma.objectives"):
        for _ in range(3):
            assert queue_size_for(4096, 400, 32) == 368
        assert queue_size_for(4096, 500, 32) == 468
    said = [r.getMessage() for r in caplog.records if "instead of queue-size" in r.getMessage()]
    assert len(said) == 2 and "368 keys" in said[0] and "468 keys" in said[1]
