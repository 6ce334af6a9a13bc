"""Training objectives behind one interface: CE-only, vanilla KD and MoMA.

An objective owns everything the loss needs besides the student (teacher, projection heads,
attention, queue) — all of it site-private state. The training loop only calls
``loss(student, x, y)`` and ``after_step(student)`` and optimises ``trainable_parameters()``
together with the student.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moma_core.attention import BatchTokenAttention
from moma_core.heads import projection_head
from moma_core.losses import kd_kl_loss
from moma_core.method_config import OBJECTIVES, ObjectiveConfig  # noqa: F401 (re-export)
from moma_core.models import feature_dim, features_and_logits
from moma_core.momentum import momentum_update_modules, paired_parameters
from moma_core.queue import KeyQueue


class Objective(nn.Module):
    """Interface: a loss on a batch plus whatever state it keeps between steps."""

    name = "objective"

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
    g_t and attention A_k; A_enq maps the batch keys before they enter the queue Q (K×512).

        q = A_q(g_s(f_s)),   k = A_k(g_t(f_t)) (no grad in the reference),
        L = c·CE(z_s, y) + d·KL_T(z_t ‖ z_s) + b·CE([q·k, q·Qᵀ]/τ, 0),   then Q ← A_enq(k).

    After each optimiser step T and g_t follow S and g_s with momentum m (``teacher_update =
    "momentum"``, the reference); with ``"frozen"`` the teacher may be any architecture.
    ``attention_keys = "trained"`` lets A_k and A_enq learn; the reference leaves them at their
    random initialisation. The reference applies its third attention to the whole queue each
    step (K tokens, a K×K matrix); here it maps the batch keys as they are enqueued (B×B).

    Observed with the reference defaults on the synthetic benchmark: because q is not
    re-normalised after A_q and positives (A_k) and negatives (A_enq) come from different
    random maps, the NCE term falls to ~0 within a few epochs and adds little; and a momentum
    teacher next to a randomly initialised student drifts towards noise, so start the student
    from the teacher (as the paper does) or use ``teacher_update="frozen"``.
    """

    name = "moma"

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: ObjectiveConfig,
                 same_task: bool) -> None:
        super().__init__(teacher, cfg, same_task)
        d_s, d_t = feature_dim(student), feature_dim(self.teacher)
        if cfg.teacher_update == "momentum" and (
            type(student) is not type(self.teacher) or d_s != d_t
        ):
            raise ValueError(
                "teacher_update='momentum' needs the teacher and student of the same "
                f"architecture (got {type(self.teacher).__name__}/{d_t} vs "
                f"{type(student).__name__}/{d_s}); use teacher_update='frozen'"
            )
        if cfg.teacher_update == "momentum":
            _check_momentum_pairs(self.teacher, student)
        emb = cfg.feat_dim if cfg.head != "none" else d_s
        self.proj_q = projection_head(d_s, cfg.feat_dim, cfg.head)
        if cfg.teacher_update == "momentum":
            self.proj_k = copy.deepcopy(self.proj_q)  # key head starts as the query head
        else:
            self.proj_k = projection_head(d_t, cfg.feat_dim, cfg.head)
        self.proj_k.requires_grad_(False)
        self.attn_q = BatchTokenAttention(emb, cfg.num_heads)
        self.attn_k = BatchTokenAttention(emb, cfg.num_heads)
        self.attn_enqueue = BatchTokenAttention(emb, cfg.num_heads)
        if cfg.attention_keys == "reference":
            self.attn_k.requires_grad_(False)
            self.attn_enqueue.requires_grad_(False)
        self.queue = KeyQueue(emb, cfg.queue_size, cfg.nce_temperature)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def loss(self, student, x, y):
        cfg = self.cfg
        f_s, z_s = features_and_logits(student, x)
        with torch.no_grad():
            f_t, z_t = features_and_logits(self.teacher, x)
            k_in = self.proj_k(f_t)
        ce = F.cross_entropy(z_s, y)
        kl = self._kl(z_s, z_t)
        q = self.attn_q(self.proj_q(f_s))
        if cfg.attention_keys == "trained":
            k = self.attn_k(k_in)
        else:
            with torch.no_grad():
                k = self.attn_k(k_in)
        logits, labels = self.queue.logits(q, k)
        nce = F.cross_entropy(logits, labels)
        self._pending_keys = k.detach().float()  # after_step runs outside autocast (AMP)
        total = cfg.ce_weight * ce + cfg.kl_weight * kl + cfg.nce_weight * nce
        return total, {"ce": ce.detach(), "kl": kl.detach(), "nce": nce.detach()}

    def after_step(self, student: nn.Module) -> None:
        keys = getattr(self, "_pending_keys", None)
        if keys is not None:
            with torch.no_grad():
                self.queue.enqueue(self.attn_enqueue(keys))
            self._pending_keys = None
        if self.cfg.teacher_update == "momentum":
            momentum_update_modules(self.teacher, student, self.cfg.momentum)
            momentum_update_modules(self.proj_k, self.proj_q, self.cfg.momentum)


def build_objective(cfg: ObjectiveConfig, student: nn.Module,
                    teacher: nn.Module | None = None, same_task: bool | None = None
                    ) -> Objective:
    """The objective ``cfg.kind`` for ``student``; ``same_task`` decides whether KL is used.

    Pass ``same_task`` from the class *names* of teacher and student (:func:`same_task`); when
    omitted it falls back to comparing class counts, which cannot tell two 4-class tasks apart.
    """
    if cfg.kind == "ce":
        return CrossEntropyOnly(cfg)
    if teacher is None:
        raise ValueError(f"objective {cfg.kind!r} needs a teacher")
    if same_task is None:
        same_task = _num_classes(teacher) == _num_classes(student)
    if cfg.kind == "kd":
        return VanillaKD(teacher, cfg, same_task)
    return MoMA(teacher, student, cfg, same_task)


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


def init_student_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copy every teacher tensor whose name and shape match into the student; returns count.

    With a teacher of another task the classifier is left at its fresh initialisation.
    """
    s_state = student.state_dict()
    matched = {k: v for k, v in teacher.state_dict().items()
               if k in s_state and s_state[k].shape == v.shape}
    student.load_state_dict(matched, strict=False)
    return len(matched)
