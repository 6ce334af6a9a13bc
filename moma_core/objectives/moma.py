"""MoMA: momentum contrastive learning with multi-head attention knowledge distillation
(Vuong & Kwak, Medical Image Analysis 2024), and the measures of its contrastive term."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moma_core.attention import BatchTokenAttention
from moma_core.heads import projection_head
from moma_core.method_config import ObjectiveConfig
from moma_core.models import feature_dim, features_and_logits
from moma_core.momentum import momentum_update, paired_parameters
from moma_core.objective_registry import register
from moma_core.objectives.base import BuildInputs, TeacherObjective, check_teacher_fits
from moma_core.queue import KeyQueue

log = logging.getLogger("moma.objectives")


@register
class MoMA(TeacherObjective):
    """Momentum contrastive learning with multi-head attention distillation (Vuong & Kwak 2024).

    Symbols: student S with query head g_s and attention A_q; momentum teacher T with key head
    g_t and attention A_k; A_enq maps the raw batch keys as they enter the queue Q (K×D). One
    step, in the order of the reference (``helper/loops_moma.py``, ``train_distill_moma``)::

        f_s, z_s = S(x);  z_t = T(x)                          (teacher *before* its update)
        T ← m·T + (1−m)·S;  g_t ← m·g_t + (1−m)·g_s          (parameters, ``teacher_update``)
        k̂ = g_t(f_T(x))                                      (no grad, updated teacher)
        q = A_q(g_s(f_s)),  k = A_k(k̂)
        L = c·CE(z_s, y) + d·KL_T(z_t ‖ z_s) + b·CE([q·k, q·Qᵀ]/τ, 0)
        after the optimiser step: Q ← A_enq(k̂)              (the raw keys, not k)

    With a momentum teacher and KL on, the teacher therefore runs twice per step (logits before,
    keys after its update); with KL off (different task) or a frozen teacher, once.
    ``kl_teacher = "after-update"`` takes z_t from the updated teacher's one forward (z_t then
    differs from the reference's by about lr·(1−m), 1e-5 to 1e-4) and saves that forward.

    A_enq's output enters the queue without gradient, so A_enq is never trained (in the
    reference neither); ``attention_keys = "trained"`` lets A_k learn, ``"reference"`` leaves
    A_k at its random initialisation as the reference does. The attention is over the B samples
    of the batch (B×B per head); the reference's MoMA script never applies attention to the
    whole queue (that is its unused ``MoCoAtt`` memory).

    **The NCE term with the reference's queue.** Positives are k = A_k(k̂), negatives A_enq(k̂)
    of earlier batches: two *different* random maps of the same keys, and q = A_q(g_s(f_s)) is
    not re-normalised. A_q learns to tell the two maps apart instead of the images, so the NCE
    term drops to exactly 0.0 within about an epoch and then gives no gradient (``moma-bench
    accuracy --quick``: the measured values are in docs/benchmarks.md). This is the
    reference's behaviour, kept by default (``queue_keys = "reference"``). ``queue_keys =
    "keys"`` enqueues k itself (MoCo's rule): positives and negatives then come from one map and
    the term stays around log(K+1), carrying gradient throughout (docs/benchmarks.md).
    The run report shows the NCE term per round.

    **Underneath both: the batch attention averages the batch.** The embeddings are
    L2-normalised (norm 1, as in the reference), and over such inputs an untrained
    :class:`BatchTokenAttention` has attention logits close to 0: weights 1/B to 1 %, so
    every sample of a batch leaves A_q (and A_k) with the same vector, the batch's mean. The
    term can then tell batches apart, never the images of one batch, and carries no per-image
    knowledge of the teacher (``bench/nce_signal.py``; what each variant measures, with a
    frozen teacher of another task too: docs/benchmarks.md).

    **The residual attention** (``moma_attention = "residual"``) keeps the published structure
    and lets the term carry each image's teacher key::

        x = g_s(f_s);  q = normalize(x + A_q(x))             (A_q's output projection starts at 0)
        k = normalize(k̂ + A_k(k̂))                            (A_k: momentum copy of A_q, no grad)
        after the optimiser step: A_k ← m·A_k + (1−m)·A_q;  Q ← k  (with each key's image index)

    Training starts from the plain per-image contrast of q and k̂ and the attention adds the
    batch's context as it learns. Positives and negatives come from one map; a queued key of the
    query's own image is never its negative (masked by image index), and the queue holds at
    most ``n_data − batch_size`` keys (:func:`queue_size_for`), so it cannot fill with stale
    copies of the site's images.

    **Is the term alive?** Every step also reports, without gradient, ``nce-shuffled`` (the
    same logits with each query's positive replaced by the key of the next image in the
    batch) and ``retrieval`` (the share of queries whose most similar key in the batch is
    their own image's): a term at exactly 0 that loses nothing when its positives are shuffled,
    or retrieval at chance (1/B), carries no per-image knowledge of the teacher.

    g_t starts as a copy of g_s (``key_head_init = "copy"``) or, as in the reference, with its
    own random initialisation (``"independent"``), then follows g_s by momentum. With a frozen
    teacher (``teacher_update = "frozen"``, any architecture) g_t is independent and fixed.
    """

    name = "moma"
    order = 30
    needs_teacher = True
    needs_index = True  # with the residual attention (the default): the instance decides
    same_task_only = False
    dp_compatible = False
    needs_public_keys = False
    loss_terms = ("ce", "kl", "nce", "nce-shuffled", "retrieval")
    report_terms = ()

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: ObjectiveConfig,
                 same_task: bool, n_data: int | None = None, batch_size: int | None = None
                 ) -> None:
        super().__init__(teacher, cfg, same_task)
        d_s, d_t = feature_dim(student), feature_dim(self.teacher)
        momentum = cfg.teacher_update == "momentum"
        self.residual = cfg.moma_attention == "residual"
        self.needs_index = self.residual  # the queue remembers each key's image
        check_teacher_fits(cfg, self.teacher, student)
        emb = cfg.feat_dim if cfg.head != "none" else d_s
        self.proj_q = projection_head(d_s, cfg.feat_dim, cfg.head)
        if momentum and cfg.key_head_init == "copy":
            self.proj_k = copy.deepcopy(self.proj_q)  # key head starts as the query head
        else:
            self.proj_k = projection_head(d_t, cfg.feat_dim, cfg.head)
        self.proj_k.requires_grad_(False)
        self.attn_q = BatchTokenAttention(emb, cfg.num_heads)
        queue_size = cfg.queue_size
        if self.residual:
            nn.init.zeros_(self.attn_q.proj.weight)  # q = x at the start: the plain contrast
            nn.init.zeros_(self.attn_q.proj.bias)
            self.attn_k = copy.deepcopy(self.attn_q)  # A_k follows A_q by momentum
            self.attn_k.requires_grad_(False)
            queue_size = queue_size_for(cfg.queue_size, n_data, batch_size)
        else:
            self.attn_k = BatchTokenAttention(emb, cfg.num_heads)
            self.attn_enqueue = BatchTokenAttention(emb, cfg.num_heads)
            self.attn_enqueue.requires_grad_(False)
            if cfg.attention_keys == "reference":
                self.attn_k.requires_grad_(False)
        self.queue = KeyQueue(emb, queue_size, cfg.nce_temperature, track_ids=self.residual)
        self._pairs: tuple[int, tuple[list, list]] | None = None
        self._pending_keys: torch.Tensor | None = None
        self._pending_ids: torch.Tensor | None = None
        self._attn_pairs: tuple[list, list] | None = None  # (A_k, A_q) parameters, residual

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, inputs: BuildInputs) -> MoMA:
        assert inputs.teacher is not None  # build_objective: needs_teacher
        return cls(inputs.teacher, inputs.student, cfg, bool(inputs.same_task),
                   n_data=inputs.n_data, batch_size=inputs.batch_size)

    @classmethod
    def check_teacher(cls, cfg: ObjectiveConfig, teacher: nn.Module, student: nn.Module
                      ) -> None:
        """A momentum teacher (``teacher_update = "momentum"``) moves towards the student:
        it needs the student's architecture (same backbone parameters)."""
        if cfg.teacher_update != "momentum":
            return
        d_s, d_t = feature_dim(student), feature_dim(teacher)
        if type(student) is not type(teacher) or d_s != d_t:
            raise ValueError(
                "teacher_update='momentum' needs the teacher and student of the same "
                f"architecture (got {type(teacher).__name__}/{d_t} vs "
                f"{type(student).__name__}/{d_s}); use teacher_update='frozen'"
            )
        _check_momentum_pairs(teacher, student)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def _momentum_step(self, student: nn.Module) -> None:
        """T ← m·T + (1−m)·S and g_t ← m·g_t + (1−m)·g_s, parameters paired once per student."""
        if self._pairs is None or self._pairs[0] != id(student):
            t_keys, s_params = paired_parameters(self.teacher, student)
            h_keys, h_params = paired_parameters(self.proj_k, self.proj_q)
            self._pairs = (id(student), (t_keys + h_keys, s_params + h_params))
        momentum_update(*self._pairs[1], self.cfg.momentum)

    def loss(self, student, x, y, index=None):
        cfg = self.cfg
        f_s, z_s = features_and_logits(student, x)
        with torch.no_grad():
            if cfg.teacher_update == "momentum":
                before = self.same_task and cfg.kl_teacher == "before-update"
                z_t = features_and_logits(self.teacher, x)[1] if before else None
                self._momentum_step(student)
                f_t, z_after = features_and_logits(self.teacher, x)
                z_t = z_t if before else z_after
            else:
                f_t, z_t = features_and_logits(self.teacher, x)
            k_raw = self.proj_k(f_t)
        ce = F.cross_entropy(z_s, y)
        kl = self._kl(z_s, z_t)
        if self.residual:
            x_q = self.proj_q(f_s)
            q = F.normalize(x_q + self.attn_q(x_q), dim=1)
            with torch.no_grad():
                k = F.normalize(k_raw + self.attn_k(k_raw), dim=1)
            pending = k
        else:
            q = self.attn_q(self.proj_q(f_s))
            if cfg.attention_keys == "trained":
                k = self.attn_k(k_raw)
            else:
                with torch.no_grad():
                    k = self.attn_k(k_raw)
            pending = k_raw if cfg.queue_keys == "reference" else k
        ids = index if self.residual else None
        logits, labels = self.queue.logits(q, k, ids)
        nce = F.cross_entropy(logits, labels)
        # after_step runs outside autocast (AMP): keys in the queue's own precision
        self._pending_keys = pending.detach().to(self.queue.queue.dtype)
        self._pending_ids = ids
        total = cfg.ce_weight * ce + cfg.kl_weight * kl + cfg.nce_weight * nce
        return total, {"ce": ce.detach(), "kl": kl.detach(), "nce": nce.detach(),
                       **nce_health(logits.detach(), q.detach(), k.detach(),
                                    self.queue.temperature)}

    def after_step(self, student: nn.Module) -> None:
        """Enqueue the step's keys (the queue is read in place by the loss): A_enq(k̂) with the
        reference attention; with the residual one, first A_k ← m·A_k + (1−m)·A_q, then k."""
        if self._pending_keys is not None:
            with torch.no_grad():
                keys = self._pending_keys
                if self.residual:
                    if self._attn_pairs is None:  # paired once: the modules never change
                        self._attn_pairs = paired_parameters(self.attn_k, self.attn_q)
                    momentum_update(*self._attn_pairs, self.cfg.momentum)
                    self.queue.enqueue(keys, self._pending_ids)
                else:
                    self.queue.enqueue(self.attn_enqueue(keys)
                                       if self.cfg.queue_keys == "reference" else keys)
            self._pending_keys = self._pending_ids = None


def queue_size_for(queue_size: int, n_data: int | None, batch_size: int | None) -> int:
    """MoMA's residual queue: at most ``n_data − batch_size`` keys, so that the queue holds
    fewer keys than the site has images besides the batch's. Without ``n_data`` and
    ``batch_size`` (a caller that does not know its data) ``queue_size`` as given.

    Raises ValueError when the training set is no larger than a batch (no room for one
    negative that is not an earlier key of the batch's own images)."""
    if n_data is None or batch_size is None:
        return queue_size
    room = n_data - batch_size
    if room < 1:
        raise ValueError(f"MoMA's queue needs more training images than one batch: {n_data} "
                         f"images, batch size {batch_size}; lower batch-size")
    if queue_size > room:
        if (queue_size, n_data, batch_size) not in _QUEUE_SIZES_SAID:  # once, not each round
            _QUEUE_SIZES_SAID.add((queue_size, n_data, batch_size))
            log.info("MoMA queue: %d keys instead of queue-size %d (%d training images - "
                     "batch %d), so the queue cannot fill with earlier keys of the site's own "
                     "images", room, queue_size, n_data, batch_size)
        return room
    return queue_size


#: (queue-size, images, batch) whose smaller queue this process has already logged
_QUEUE_SIZES_SAID: set[tuple[int, int, int]] = set()


@torch.no_grad()
def nce_health(logits: torch.Tensor, q: torch.Tensor, k: torch.Tensor, temperature: float
               ) -> dict[str, torch.Tensor]:
    """Whether the NCE term carries per-image knowledge (no gradient, no random numbers).

    ``nce-shuffled``: the NCE of the same logits with each query's positive replaced by the
    key of the next image in the batch (a derangement: roll by one); the gap ``nce-shuffled −
    nce`` is what knowing its own image's key is worth to a query, 0 when the term only tells
    batches apart. ``retrieval``: the share of queries whose most similar key in the batch is
    their own image's (chance: 1/B). A batch of one has neither.
    """
    b = q.shape[0]
    if b < 2:
        return {}
    q, k = q.float(), k.float()
    # CE of [pos', neg] at label 0 = logsumexp(pos', lse(neg)) − pos': the B×K negatives are
    # reduced once, never copied
    shuffled = (q * k.roll(1, dims=0)).sum(dim=1) / temperature
    negatives = torch.logsumexp(logits[:, 1:].float(), dim=1)
    nce_shuffled = (torch.logaddexp(shuffled, negatives) - shuffled).mean()
    top = (q @ k.t()).argmax(dim=1)
    return {"nce-shuffled": nce_shuffled,
            "retrieval": (top == torch.arange(b, device=q.device)).float().mean()}


def _check_momentum_pairs(teacher: nn.Module, student: nn.Module) -> None:
    keys, _ = paired_parameters(teacher, student)
    head = len(list(student.get_classifier().parameters()))
    if len(keys) < len(list(student.parameters())) - head:
        raise ValueError(
            "teacher_update='momentum' needs teacher and student backbones with identical "
            "parameters; use teacher_update='frozen' for a different teacher architecture"
        )
