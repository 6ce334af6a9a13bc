"""MoMA's pieces against small hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moma_core.attention import BatchTokenAttention
from moma_core.heads import projection_head
from moma_core.losses import kd_kl_loss
from moma_core.momentum import momentum_update_modules
from moma_core.queue import KeyQueue


def test_queue_fifo_wraps_around():
    q = KeyQueue(dim=2, size=5)
    first = torch.arange(6.0).reshape(3, 2)
    q.enqueue(first)
    assert int(q.queue_ptr) == 3
    assert torch.equal(q.queue[:3], first)
    second = -torch.arange(1.0, 7.0).reshape(3, 2)
    q.enqueue(second)
    assert int(q.queue_ptr) == 1  # 3 + 3 wraps past 5
    assert torch.equal(q.queue[3:5], second[:2])
    assert torch.equal(q.queue[0], second[2])  # third key overwrote the oldest row
    assert torch.equal(q.queue[1:3], first[1:3])


def test_queue_initial_rows_are_unit_norm():
    q = KeyQueue(dim=16, size=32)
    assert torch.allclose(q.queue.norm(dim=1), torch.ones(32), atol=1e-5)


def test_nce_logits_shape_values_and_labels():
    torch.manual_seed(0)
    queue = KeyQueue(dim=4, size=6, temperature=0.5)
    q, k = torch.randn(3, 4), torch.randn(3, 4)
    logits, labels = queue.logits(q, k)
    assert logits.shape == (3, 1 + 6)
    assert labels.tolist() == [0, 0, 0]
    assert torch.allclose(logits[:, 0], (q * k).sum(1) / 0.5)
    assert torch.allclose(logits[1, 1:], queue.queue @ q[1] / 0.5)


def test_nce_does_not_backpropagate_into_queue():
    queue = KeyQueue(dim=4, size=6)
    q = torch.randn(2, 4, requires_grad=True)
    logits, labels = queue.logits(q, torch.randn(2, 4))
    F.cross_entropy(logits, labels).backward()
    assert q.grad is not None and queue.queue.grad is None


def test_momentum_update_formula():
    key, query = nn.Linear(2, 2), nn.Linear(2, 2)
    k0 = key.weight.detach().clone()
    q0 = query.weight.detach().clone()
    momentum_update_modules(key, query, m=0.9)
    assert torch.allclose(key.weight, 0.9 * k0 + 0.1 * q0)
    assert torch.equal(query.weight, q0)  # the query network is untouched


def test_momentum_update_leaves_buffers():
    key, query = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    query.running_mean.fill_(5.0)
    momentum_update_modules(key, query, m=0.5)
    assert torch.equal(key.running_mean, torch.zeros(3))


def test_kl_times_t_squared_hand_computed():
    zs = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    zt = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    T = 2.0
    total = 0.0
    for s, t in zip(zs, zt, strict=True):
        ps = torch.softmax(s / T, 0)
        pt = torch.softmax(t / T, 0)
        total += float((pt * (pt.log() - ps.log())).sum())
    expected = total / 2 * T * T
    assert math.isclose(float(kd_kl_loss(zs, zt, T)), expected, rel_tol=1e-6)
    assert float(kd_kl_loss(zt, zt, T)) == pytest.approx(0.0, abs=1e-7)


def test_attention_is_across_the_batch():
    torch.manual_seed(0)
    attn = BatchTokenAttention(dim=8, num_heads=4)
    x = torch.randn(5, 8)
    w = attn.attention_matrix(x)
    assert w.shape == (4, 5, 5)  # heads × B × B
    assert torch.allclose(w.sum(-1), torch.ones(4, 5), atol=1e-6)
    out = attn(x)
    assert out.shape == (5, 8)
    x2 = x.clone()
    x2[4] += 1.0  # changing sample 4 changes the output of sample 0: tokens are samples
    assert not torch.allclose(attn(x2)[0], out[0])


def _own_share(v: torch.Tensor) -> float:
    """The share of the rows' energy that is not the batch mean's."""
    centred = v - v.mean(dim=0, keepdim=True)
    return float(centred.pow(2).sum(1).mean() / v.pow(2).sum(1).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_untrained_attention_gives_every_unit_embedding_of_a_batch_the_batch_mean(seed):
    """Why MoMA's NCE term cannot tell the images of a batch apart (docs/benchmarks.md, "Why
    the NCE term carries no teacher knowledge here"): MoMA's embeddings are L2-normalised,
    and over vectors of norm 1 an untrained batch attention (the reference's initialisation:
    512-d, 4 heads) has attention logits close to 0, weights 1/B to within 1 %, and gives
    every sample the same output. Control: the same attention keeps the samples apart when
    the inputs are 30 times longer."""
    torch.manual_seed(seed)
    attn = BatchTokenAttention(512, 4)
    x = projection_head(64, 512, "mlp")(torch.randn(32, 64))
    with torch.no_grad():
        weights, out = attn.attention_matrix(x), attn(x)
        control = attn(30 * x)
    assert _own_share(x) > 0.3  # the embeddings themselves differ
    assert float((weights * 32 - 1).abs().max()) < 0.01  # every weight is 1/B to 1 %
    assert _own_share(out) < 1e-6  # each output row is the batch's mean
    assert _own_share(control) > 1e-3


def test_attention_rejects_bad_head_count():
    with pytest.raises(ValueError):
        BatchTokenAttention(dim=10, num_heads=4)


@pytest.mark.parametrize("kind,dim", [("mlp", 512), ("linear", 512), ("none", 32)])
def test_projection_heads_are_unit_norm(kind, dim):
    head = projection_head(32, 512, kind)
    out = head(torch.randn(4, 32))
    assert out.shape == (4, dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
