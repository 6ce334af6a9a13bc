"""Training objectives behind one interface: CE-only, vanilla KD, MoMA (and CRCKD, moma_core.crckd).

An objective owns everything the loss needs besides the student (teacher, projection heads,
attention, queue) — all of it site-private state. The training loop only calls
``loss(student, x, y)`` and ``after_step(student)`` and optimises ``trainable_parameters()``
together with the student.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from moma_core.attention import BatchTokenAttention
from moma_core.heads import projection_head
from moma_core.losses import kd_kl_loss
from moma_core.method_config import OBJECTIVES, ObjectiveConfig  # noqa: F401 (re-export)
from moma_core.models import feature_dim, features_and_logits
from moma_core.momentum import momentum_update, paired_parameters
from moma_core.queue import KeyQueue

log = logging.getLogger("moma.objectives")


class Objective(nn.Module):
    """Interface: a loss on a batch plus whatever state it keeps between steps."""

    name = "objective"
    # True when the loss is a mean of per-sample terms, each depending on its own sample only
    # and on no state kept from earlier private batches: usable with DP-SGD (moma_core.privacy)
    dp_compatible = False

    def loss(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def after_step(self, student: nn.Module) -> None:
        """Called after each optimiser step (momentum updates, queue)."""

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the objective optimised together with the student."""
        return iter(())


class CrossEntropyOnly(Objective):
    """Baseline without a teacher: c·CE."""

    name = "ce"
    dp_compatible = True

    def __init__(self, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def loss(self, student, x, y):
        _, z_s = features_and_logits(student, x)
        ce = F.cross_entropy(z_s, y)
        return self.cfg.ce_weight * ce, {"ce": ce.detach()}


class _TeacherObjective(Objective):
    """Holds a teacher copy that never receives gradients and stays in eval mode."""

    def __init__(self, teacher: nn.Module, cfg: ObjectiveConfig, same_task: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.same_task = same_task
        self.teacher = copy.deepcopy(teacher)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> _TeacherObjective:
        super().train(mode)
        self.teacher.eval()  # BN statistics of the teacher are never re-estimated
        return self

    def _kl(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        if not self.same_task:
            return z_s.new_zeros(())
        return kd_kl_loss(z_s, z_t, self.cfg.kd_temperature)


class VanillaKD(_TeacherObjective):
    """Hinton KD: c·CE + d·KL(T). Needs the teacher to share the student's label space."""

    name = "kd"
    dp_compatible = True

    def __init__(self, teacher: nn.Module, cfg: ObjectiveConfig, same_task: bool) -> None:
        if not same_task:
            raise ValueError("vanilla KD needs a teacher of the same task (same classes)")
        super().__init__(teacher, cfg, same_task)

    def loss(self, student, x, y):
        _, z_s = features_and_logits(student, x)
        with torch.no_grad():
            _, z_t = features_and_logits(self.teacher, x)
        ce = F.cross_entropy(z_s, y)
        kl = self._kl(z_s, z_t)
        total = self.cfg.ce_weight * ce + self.cfg.kl_weight * kl
        return total, {"ce": ce.detach(), "kl": kl.detach()}


class MoMA(_TeacherObjective):
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
    accuracy --quick``, docs/benchmarks.md: 0.85 in round 1, then 0.0). This is the
    reference's behaviour, kept by default (``queue_keys = "reference"``). ``queue_keys =
    "keys"`` enqueues k itself (MoCo's rule): positives and negatives then come from one map and
    the term stays around log(K+1), carrying gradient throughout (4.7–5.7 per round there,
    K = 256: log 257 ≈ 5.5).
    The run report shows the NCE term per round.

    **Underneath both: the batch attention averages the batch.** The embeddings are
    L2-normalised (norm 1, as in the reference), and over such inputs an untrained
    :class:`BatchTokenAttention` has attention logits close to 0: weights 1/B to 1 %, so
    every sample of a batch leaves A_q (and A_k) with the same vector, the batch's mean. The
    term can then tell batches apart, never the images of one batch, and carries no per-image
    knowledge of the teacher (``bench/nce_signal.py``, docs/benchmarks.md; with a frozen
    teacher of another task: reference 0.0, ``keys`` at chance, ``keys`` with a trained A_k
    0.0 and then NaN, as the keys' norm grows).

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
        log.info("MoMA queue: %d keys instead of queue-size %d (%d training images - batch "
                 "%d), so the queue cannot fill with earlier keys of the site's own images",
                 room, queue_size, n_data, batch_size)
        return room
    return queue_size


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


def build_objective(cfg: ObjectiveConfig, student: nn.Module,
                    teacher: nn.Module | None = None, same_task: bool | None = None,
                    n_data: int | None = None, public_keys: torch.Tensor | None = None,
                    batch_size: int | None = None) -> Objective:
    """The objective ``cfg.kind`` for ``student``; ``same_task`` decides whether KL is used.

    Pass ``same_task`` from the class *names* of teacher and student (:func:`same_task`); when
    omitted it falls back to comparing class counts, which cannot tell two 4-class tasks apart.
    CRCKD keeps one memory-bank row per training sample: give ``n_data`` (the training set's
    size) and feed it :func:`training_set` batches, which carry each sample's index; MoMA's
    residual attention sizes its queue from ``n_data`` and ``batch_size``
    (:func:`queue_size_for`) and also takes :func:`training_set` batches.
    ``dp-moma`` (:class:`moma_core.privacy.dp_moma.DPMoMA`) needs ``public_keys``: the frozen
    teacher's keys of non-private images, ``public_queue(teacher, images)`` (no key head).
    """
    if cfg.kind == "ce":
        return CrossEntropyOnly(cfg)
    if teacher is None:
        raise ValueError(f"objective {cfg.kind!r} needs a teacher")
    if same_task is None:
        same_task = _num_classes(teacher) == _num_classes(student)
    if cfg.kind == "kd":
        return VanillaKD(teacher, cfg, same_task)
    if cfg.kind == "dp-moma":
        from moma_core.privacy.dp_moma import DPMoMA  # (dp_moma builds on this module)

        if public_keys is None:
            raise ValueError("objective 'dp-moma' needs public_keys: the frozen teacher's keys "
                             "of non-private images (moma_core.privacy.dp_moma.public_queue)")
        return DPMoMA(teacher, student, cfg, same_task, public_keys)
    if cfg.kind == "crckd":
        from moma_core.crckd import CRCKD  # (crckd builds on this module)

        if n_data is None:
            raise ValueError("objective 'crckd' needs the training set's size (n_data)")
        return CRCKD(teacher, student, n_data, same_task=same_task, ce_weight=cfg.ce_weight,
                     consistency_weight=cfg.kl_weight)
    return MoMA(teacher, student, cfg, same_task, n_data=n_data, batch_size=batch_size)


def training_set(objective: Objective, dataset: Dataset) -> Dataset:
    """``dataset`` as the objective consumes it: items ``(x, y, index)`` for objectives with
    per-sample state (``needs_index``), else unchanged."""
    if getattr(objective, "needs_index", False):
        from moma_core.data.indexed import WithIndex

        return WithIndex(dataset)
    return dataset


def check_teacher_fits(cfg: ObjectiveConfig, teacher: nn.Module, student: nn.Module) -> None:
    """Refuse (ValueError) a teacher the objective cannot pair with ``student``.

    MoMA with ``teacher_update = "momentum"`` moves the teacher towards the student (MoCo's key
    encoder), and CRCKD's mean teacher is an EMA of the student: both need the student to be
    the teacher's architecture (same backbone parameters; the classifier may differ). MoMA with a
    frozen teacher, KD and CE take any teacher. The objectives call this when they are built;
    the coordinator calls it on untrained models before a run starts.
    """
    if cfg.kind == "crckd":
        from moma_core.crckd import check_same_architecture

        check_same_architecture(teacher, student)
    elif cfg.kind == "moma" and cfg.teacher_update == "momentum":
        d_s, d_t = feature_dim(student), feature_dim(teacher)
        if type(student) is not type(teacher) or d_s != d_t:
            raise ValueError(
                "teacher_update='momentum' needs the teacher and student of the same "
                f"architecture (got {type(teacher).__name__}/{d_t} vs "
                f"{type(student).__name__}/{d_s}); use teacher_update='frozen'"
            )
        _check_momentum_pairs(teacher, student)


def _check_momentum_pairs(teacher: nn.Module, student: nn.Module) -> None:
    keys, _ = paired_parameters(teacher, student)
    head = len(list(student.get_classifier().parameters()))
    if len(keys) < len(list(student.parameters())) - head:
        raise ValueError(
            "teacher_update='momentum' needs teacher and student backbones with identical "
            "parameters; use teacher_update='frozen' for a different teacher architecture"
        )


def same_task(teacher_classes: tuple[str, ...] | list[str],
              student_classes: tuple[str, ...] | list[str]) -> bool:
    """Teacher and student share the label space (same names, same order): KL applies."""
    return tuple(teacher_classes) == tuple(student_classes)


def _num_classes(model: nn.Module) -> int:
    return int(model.get_classifier().out_features)


def init_student_from_teacher(student: nn.Module, teacher: nn.Module,
                              classifier: bool = True) -> int:
    """Copy every teacher tensor whose name and shape match into the student; returns count.

    ``classifier=False`` (a teacher of another task: pass ``same_task(...)``) leaves the
    student's classifier at its fresh initialisation even when the class counts agree — the
    teacher's class k is not the student's class k.
    """
    s_state = student.state_dict()
    head = {f"{name}." for name, module in student.named_modules()
            if module is student.get_classifier()}
    matched = {k: v for k, v in teacher.state_dict().items()
               if k in s_state and s_state[k].shape == v.shape
               and (classifier or not any(k.startswith(p) for p in head))}
    student.load_state_dict(matched, strict=False)
    return len(matched)
