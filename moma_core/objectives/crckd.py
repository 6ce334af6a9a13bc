"""CRCKD as an objective: mean teacher, class-guided contrast and categorical relations.

Xing et al., "Categorical Relation-Preserving Contrastive Knowledge Distillation for Medical
Image Classification", MICCAI 2021 (arXiv 2107.03225); read from the authors' code
(github hathawayxxh/CRCKD: ``train_CRCKD.py``, ``utils/CCD_CRP_loss.py``, ``utils/memory.py``,
``utils/ramps.py``) and /work/shared/METHOD.md, section CRCKD.

Symbols. Student S: pooled feature f_s, logits z_s, embedding head g_s. Mean teacher T (an EMA of
S, starting as a copy of the given teacher): f_t, z_t and head g_t (an EMA of g_s); every head is
``g = L2norm(Linear(d, feat_dim))``. Memory banks M_s, M_t (N×feat_dim, one row per training
sample, random-normal rows L2-normalised at start) and the row labels ℓ (N, −1 = never written).
One step on a batch x with labels y and dataset indices I (x2 = ``second_view(x)``)::

    u = g_s(f_s(x)),   v = g_t(f_t(x2)) (no grad)
    CCD: anchor i draws P positives (rows of class y_i; the first is its own row I_i once that
         row has been written) and K negatives (rows of other classes) from the written rows;
         s_ij = u_i·M_t[j]/τ (student anchor vs teacher bank), t_ij = v_i·M_s[j]/τ (teacher
         anchor vs student bank); with x = exp(s)/Z and noise K/N, the NCE of CRD:
         L_CCD = −1/B Σ_i [1/P Σ_{j∈pos} log x/(x+K/N) + Σ_{j∈neg} log (K/N)/(x+K/N)],
         once with s (Z_s) and once with t (Z_t); each Z = N·mean(exp(·)) of the first batch
         that contrasts anything, then fixed (CRD's normaliser).
    CRP: c_k^s = normalise(mean{M_s[j] : ℓ_j = k}), c_k^t likewise from M_t;
         r_s = softmax_k(u·c_k^s/τ), r_t = softmax_k(v·c_k^t/τ);  L_CRP = KL(r_t ‖ r_s).
    L = c·CE_w(z_s, y) + λ(step)·KL(z_t ‖ z_s) + w·L_CCD + r·L_CRP
    after the optimiser step: M[I] ← normalise(0.5·M[I] + 0.5·g) in both banks, ℓ[I] ← y;
         θ_T ← α·θ_T + (1−α)·θ_S and g_t ← α·g_t + (1−α)·g_s, α = min(1 − 1/(step+1), 0.99).

Which terms train the student. CE and KL through z_s; the student-anchor half of CCD and CRP
through u (backbone and g_s). Bank rows and centroids are buffers (constants), v comes from the
no-grad teacher, so the teacher-anchor half of CCD has *no* gradient at all: it is computed
without a graph and only reported in ``parts["ccd"]``; what it contributes to learning is the
student bank M_s that it reads (and that CRP's student centroids come from). In the reference
g_t is an optimised head, so there that half trains g_t; here g_t follows g_s by EMA.

Start of training. Rows never written are never positives, negatives or part of a centroid
(their random initialisation carries no class). An anchor whose class has no written row yet,
or whose other classes have none, drops out of CCD (the mean runs over the anchors that
contrast; CCD is 0 while none does, e.g. on the first step). K = min(``nce_k``, fewest written
rows of another class among the batch's classes), so the NCE noise ratio K/N counts the
negatives actually drawn. CRP's softmax runs over the classes with a written row (0 with one).
The first write of a row blends it with its random initialisation (the reference's formula;
``bank_first_write="copy"`` writes g itself the first time, as unwritten rows are never read).

Federated use: banks, labels, Z, the step and the mean teacher are computed from the site's
private images and stay at the site (buffers of this module, saved with its ``state_dict``).
The mean teacher forgets the given teacher after the first step (α = 0 at step 0, the
reference's "true average" warm-up): start the student from the teacher
(:func:`moma_core.objectives.init_student_from_teacher`), or pass ``ema_warmup=False`` to use
α = ``ema_max`` from the first step.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moma_core.heads import projection_head
from moma_core.losses import kd_kl_loss
from moma_core.method_config import ObjectiveConfig
from moma_core.models import feature_dim, features_and_logits
from moma_core.momentum import momentum_update, paired_parameters
from moma_core.objective_registry import register
from moma_core.objectives.base import BuildInputs, TeacherObjective

SecondView = Callable[[torch.Tensor], torch.Tensor]


def sigmoid_rampup(step: int, length: int) -> float:
    """exp(−5·(1 − t)²) with t = min(step, length)/length (Laine & Aila); 1 when length is 0."""
    if length <= 0:
        return 1.0
    t = min(max(step, 0), length) / length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def ema_alpha(step: int, ema_max: float = 0.99, warmup: bool = True) -> float:
    """Mean-teacher decay: min(1 − 1/(step+1), ema_max), or ``ema_max`` without warm-up."""
    return min(1.0 - 1.0 / (step + 1), ema_max) if warmup else ema_max


@torch.no_grad()
def bank_update(bank: torch.Tensor, index: torch.Tensor, g: torch.Tensor,
                momentum: float = 0.5) -> None:
    """In place: ``bank[i] ← normalise(momentum·bank[i] + (1−momentum)·g)`` for i in ``index``.

    ``index`` must not repeat within one call (see :func:`first_occurrences`).
    """
    rows = bank.index_select(0, index) * momentum + g.to(bank.dtype) * (1.0 - momentum)
    bank.index_copy_(0, index, F.normalize(rows, dim=1))


def first_occurrences(index: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each distinct value of ``index`` (sorted by value).

    A sampler with replacement can repeat a sample within a batch; its bank row is then written
    once, from its first occurrence.
    """
    uniq, inverse = torch.unique(index, return_inverse=True)
    pos = torch.arange(index.numel(), device=index.device)
    first = torch.full((uniq.numel(),), index.numel(), dtype=torch.long, device=index.device)
    return first.scatter_reduce_(0, inverse, pos, reduce="amin")


def class_centroids(bank: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised mean of the written rows of each class (C×D) and which classes have any.

    ``labels`` −1 marks rows never written; they are left out. ``relu`` clamps the rows at 0
    before the mean, as the reference does (``F.relu`` in ``CCD_CRP_Loss``).
    """
    written = labels >= 0
    rows, lab = bank[written], labels[written]
    if relu:
        rows = rows.clamp_min(0)
    sums = bank.new_zeros(num_classes, bank.shape[1]).index_add_(0, lab, rows)
    counts = torch.bincount(lab, minlength=num_classes)
    means = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
    return F.normalize(means, dim=1), counts > 0


def relation_kl(u: torch.Tensor, centroids_s: torch.Tensor, v: torch.Tensor,
                centroids_t: torch.Tensor, present: torch.Tensor, temperature: float
                ) -> torch.Tensor:
    """CRP: KL(r_t ‖ r_s), batch mean, r = softmax over the present classes of (e·c)/τ."""
    if not bool(present.any()):
        return u.new_zeros(())
    log_r_s = F.log_softmax(u @ centroids_s[present].detach().t() / temperature, dim=1)
    log_r_t = F.log_softmax(v.detach() @ centroids_t[present].detach().t() / temperature, dim=1)
    return F.kl_div(log_r_s, log_r_t, reduction="batchmean", log_target=True)


def sample_contrast_rows(index: torch.Tensor, y: torch.Tensor, bank_labels: torch.Tensor,
                         num_pos: int, num_neg: int
                         ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Bank rows each anchor is contrasted with: ``(rows B×(P+K), valid B, K)``.

    Columns 0..P−1 are positives (column 0: the anchor's own row once written, else a draw),
    the rest K negatives; draws are uniform with replacement (as CRD's sampler) among the
    written rows of the anchor's class / of the other classes. An anchor is valid when both
    sets are non-empty; K = min(``num_neg``, smallest negative set among the valid classes).
    Rows of invalid anchors are 0 and must be ignored.
    """
    device = index.device
    n = index.shape[0]
    written_rows = torch.nonzero(bank_labels >= 0).squeeze(1)
    row_labels = bank_labels[written_rows]
    candidates = {}
    for c in torch.unique(y).tolist():
        pos, neg = written_rows[row_labels == c], written_rows[row_labels != c]
        if pos.numel() and neg.numel():
            candidates[c] = (pos, neg)
    valid = torch.zeros(n, dtype=torch.bool, device=device)
    if not candidates:
        return index.new_zeros(n, num_pos), valid, 0
    k = min(num_neg, min(neg.numel() for _, neg in candidates.values()))
    rows = index.new_zeros(n, num_pos + k)
    own_written = bank_labels[index] >= 0
    for c, (pos, neg) in candidates.items():
        members = torch.nonzero(y == c).squeeze(1)
        m = members.numel()
        draw_pos = pos[torch.randint(pos.numel(), (m, num_pos), device=device)]
        draw_pos[:, 0] = torch.where(own_written[members], index[members], draw_pos[:, 0])
        draw_neg = neg[torch.randint(neg.numel(), (m, k), device=device)]
        rows[members] = torch.cat([draw_pos, draw_neg], dim=1)
        valid[members] = True
    return rows, valid, k


def crd_nce_loss(logits: torch.Tensor, num_pos: int, log_z: torch.Tensor | float,
                 n_data: int) -> torch.Tensor:
    """CRD's NCE on ``logits`` = similarity/τ (B×(P+K), positives first), in log space.

    x = exp(logits)/Z; noise m·Pn = K/N;
    −mean_b [mean_{pos} log x/(x + K/N) + Σ_{neg} log (K/N)/(x + K/N)]
    (``ContrastLoss`` of the reference with its ε = 1e-7 left out).
    """
    k = logits.shape[1] - num_pos
    log_noise = math.log(k / n_data)
    log_x = logits - log_z
    log_denom = torch.logaddexp(log_x, log_x.new_tensor(log_noise))
    log_d1 = (log_x - log_denom)[:, :num_pos]
    log_d0 = (log_noise - log_denom)[:, num_pos:]
    return -(log_d1.mean(dim=1) + log_d0.sum(dim=1)).mean()


def nce_log_normaliser(logits: torch.Tensor, n_data: int) -> torch.Tensor:
    """log Z with Z = N·mean(exp(logits)) (CRD sets it once, from its first batch)."""
    return torch.logsumexp(logits.flatten(), dim=0) - math.log(logits.numel()) + math.log(n_data)


@register
class CRCKD(TeacherObjective):
    """Mean teacher + class-guided contrastive distillation + categorical relations (CRCKD).

    See the module docstring for the formulas. ``n_data`` is the size of the training set (one
    bank row per sample); ``loss`` needs ``index=`` (each sample's position in that set, e.g.
    from :class:`moma_core.data.indexed.WithIndex`). ``second_view(x) -> x2`` produces the
    teacher's input (the reference gives the teacher a second augmentation of each image); the
    default feeds the teacher the student's batch, since the project's loader yields one view
    (:func:`random_flip_rot90` is a cheap label-preserving alternative for pathology tiles).

    The consistency weight is ``consistency_weight · exp(−5(1 − t)²)``, t = min(step,
    ``rampup_steps``)/``rampup_steps`` (the reference's ``sigmoid_rampup``, there per epoch
    over 30 epochs; here per optimiser step since an objective sees steps, not epochs, across
    federated rounds); 0 when ``same_task`` is false (the teacher's logits mean other classes).
    ``class_weights`` weights the CE per class (the reference uses N/N_c; None: unweighted).
    ``ema_buffers`` also lets the teacher's float buffers (BatchNorm statistics) follow the
    student with α; by default only parameters do and the teacher keeps the given teacher's
    statistics (it always runs in eval mode; the reference's runs in train mode).
    """

    name = "crckd"
    order = 40
    needs_teacher = True
    needs_index = True
    same_task_only = False
    dp_compatible = False
    needs_public_keys = False
    loss_terms = ("ce", "kl", "ccd", "crp")
    report_terms = ()

    bank_s: torch.Tensor
    bank_t: torch.Tensor
    bank_labels: torch.Tensor
    step: torch.Tensor
    log_z: torch.Tensor

    def __init__(self, teacher: nn.Module, student: nn.Module, n_data: int, *,
                 same_task: bool = True, feat_dim: int = 128, nce_t: float = 0.07,
                 nce_p: int = 4, nce_k: int = 4096, bank_momentum: float = 0.5,
                 ema_max: float = 0.99, ema_warmup: bool = True, ema_buffers: bool = False,
                 ce_weight: float = 1.0, consistency_weight: float = 1.0,
                 consistency_temperature: float = 1.0, rampup_steps: int = 1000,
                 ccd_weight: float = 0.1, crp_weight: float = 1.0, crp_t: float = 0.07,
                 centroid_relu: bool = False, bank_first_write: str = "blend",
                 class_weights: torch.Tensor | None = None,
                 second_view: SecondView | None = None,
                 cfg: ObjectiveConfig | None = None) -> None:
        # its settings are its own arguments; cfg, when built from one, is kept for reference
        super().__init__(teacher, cfg or ObjectiveConfig(kind="crckd"), same_task)
        check_same_architecture(self.teacher, student)
        if n_data < 1 or feat_dim < 1 or nce_p < 1 or nce_k < 1:
            raise ValueError("n_data, feat_dim, nce_p and nce_k must be at least 1")
        if nce_t <= 0 or crp_t <= 0 or consistency_temperature <= 0:
            raise ValueError("temperatures must be positive")
        if not 0 <= ema_max < 1 or not 0 <= bank_momentum < 1:
            raise ValueError("ema_max and bank_momentum must be in [0, 1)")
        if rampup_steps < 0 or min(ce_weight, consistency_weight, ccd_weight, crp_weight) < 0:
            raise ValueError("rampup_steps and the loss weights must be >= 0")
        self.num_classes = int(student.get_classifier().out_features)
        self.n_data, self.feat_dim = int(n_data), int(feat_dim)
        self.nce_t, self.nce_p, self.nce_k = float(nce_t), int(nce_p), int(nce_k)
        self.bank_momentum = float(bank_momentum)
        self.ema_max, self.ema_warmup, self.ema_buffers = float(ema_max), ema_warmup, ema_buffers
        self.ce_weight, self.consistency_weight = float(ce_weight), float(consistency_weight)
        self.consistency_temperature, self.rampup_steps = consistency_temperature, rampup_steps
        self.ccd_weight, self.crp_weight, self.crp_t = ccd_weight, crp_weight, crp_t
        self.centroid_relu = centroid_relu
        if bank_first_write not in ("blend", "copy"):
            raise ValueError("bank_first_write must be 'blend' or 'copy'")
        self.bank_first_write = bank_first_write
        self.second_view = second_view
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if class_weights.numel() != self.num_classes:
                raise ValueError(f"class_weights has {class_weights.numel()} entries for "
                                 f"{self.num_classes} classes")
        self.register_buffer("class_weights", class_weights)

        self.embed_s = projection_head(feature_dim(student), feat_dim, "linear")
        self.embed_t = projection_head(feature_dim(self.teacher), feat_dim, "linear")
        self.embed_t.load_state_dict(self.embed_s.state_dict())  # g_t starts as g_s
        self.embed_t.requires_grad_(False)
        self.register_buffer("bank_s", F.normalize(torch.randn(n_data, feat_dim), dim=1))
        self.register_buffer("bank_t", F.normalize(torch.randn(n_data, feat_dim), dim=1))
        self.register_buffer("bank_labels", torch.full((n_data,), -1, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("log_z", torch.full((2,), float("nan")))  # Z_s, Z_t: unset
        self._pending: tuple[torch.Tensor, ...] | None = None
        # (student, (teacher + g_t parameters, student + g_s parameters)), paired once per student
        self._pairs: tuple[weakref.ref, tuple[list, list]] | None = None

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, inputs: BuildInputs) -> CRCKD:
        """CRCKD with the config's CE weight, its KL weight as the consistency weight, and the
        reference's other settings."""
        assert inputs.teacher is not None  # build_objective: needs_teacher
        if inputs.n_data is None:
            raise ValueError("objective 'crckd' needs the training set's size (n_data)")
        return cls(inputs.teacher, inputs.student, inputs.n_data,
                   same_task=bool(inputs.same_task), ce_weight=cfg.ce_weight,
                   consistency_weight=cfg.kl_weight, cfg=cfg)

    @classmethod
    def check_teacher(cls, cfg: ObjectiveConfig, teacher: nn.Module, student: nn.Module
                      ) -> None:
        check_same_architecture(teacher, student)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.embed_s.parameters())

    def consistency_ramp(self, step: int | None = None) -> float:
        """λ(step): the consistency weight times the sigmoid ramp."""
        step = int(self.step) if step is None else step
        return self.consistency_weight * sigmoid_rampup(step, self.rampup_steps)

    def _kl(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        if not self.same_task:
            return z_s.new_zeros(())
        return kd_kl_loss(z_s, z_t, self.consistency_temperature)

    def _check_index(self, index: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        if index is None:
            raise ValueError(
                "CRCKD needs each sample's dataset index: wrap the training set with "
                "moma_core.data.indexed.WithIndex and call loss(student, x, y, index=i)")
        index = torch.as_tensor(index, device=y.device).flatten()
        if index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"CRCKD: index must hold integers, got {index.dtype}")
        index = index.long()
        if index.shape[0] != y.shape[0]:
            raise ValueError(f"CRCKD: {index.shape[0]} indices for a batch of {y.shape[0]}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n_data):
            raise ValueError(f"CRCKD: sample index outside the memory bank [0, {self.n_data}): "
                             "n_data must be the size of the (indexed) training set")
        return index

    def loss(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
             index: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = self._check_index(index, y)
        f_s, z_s = features_and_logits(student, x)
        u = self.embed_s(f_s)
        with torch.no_grad():
            x2 = x if self.second_view is None else self.second_view(x)
            f_t, z_t = features_and_logits(self.teacher, x2)
            v = self.embed_t(f_t)
        ce = F.cross_entropy(z_s, y, weight=self.class_weights)
        kl = self._kl(z_s, z_t)
        with torch.autocast(u.device.type, enabled=False):  # exp(1/τ) overflows half precision
            u32, v32 = u.float(), v.float()
            ccd = self._ccd(u32, v32, index, y)
            cent_s, present = class_centroids(self.bank_s, self.bank_labels, self.num_classes,
                                              self.centroid_relu)
            cent_t, _ = class_centroids(self.bank_t, self.bank_labels, self.num_classes,
                                        self.centroid_relu)
            crp = relation_kl(u32, cent_s, v32, cent_t, present, self.crp_t)
        self._pending = (index.detach(), y.detach(), u32.detach(), v32.detach())
        total = (self.ce_weight * ce + self.consistency_ramp() * kl
                 + self.ccd_weight * ccd + self.crp_weight * crp)
        return total, {"ce": ce.detach(), "kl": kl.detach(), "ccd": ccd.detach(),
                       "crp": crp.detach()}

    def _ccd(self, u: torch.Tensor, v: torch.Tensor, index: torch.Tensor, y: torch.Tensor
             ) -> torch.Tensor:
        """Both NCE directions on the anchors that have positives and negatives (see module)."""
        rows, valid, _ = sample_contrast_rows(index, y, self.bank_labels, self.nce_p, self.nce_k)
        if not bool(valid.any()):
            return u.new_zeros(())
        rows = rows[valid]
        # u·M[j] for the sampled j: one B×N product, then gather (cheaper than B×(P+K)×D rows)
        logits_s = (u[valid] @ self.bank_t.t()).gather(1, rows) / self.nce_t
        with torch.no_grad():
            logits_t = (v[valid] @ self.bank_s.t()).gather(1, rows) / self.nce_t
            if bool(torch.isnan(self.log_z).any()):
                self.log_z[0] = nce_log_normaliser(logits_s, self.n_data)
                self.log_z[1] = nce_log_normaliser(logits_t, self.n_data)
            ccd_t = crd_nce_loss(logits_t, self.nce_p, self.log_z[1], self.n_data)
        ccd_s = crd_nce_loss(logits_s, self.nce_p, self.log_z[0].detach(), self.n_data)
        return ccd_s + ccd_t

    @torch.no_grad()
    def _write_banks(self, index: torch.Tensor, y: torch.Tensor, u: torch.Tensor,
                     v: torch.Tensor) -> None:
        keep = first_occurrences(index)
        index, y, u, v = index[keep], y[keep], u[keep], v[keep]
        if self.bank_first_write == "copy":
            new = self.bank_labels[index] < 0
            self.bank_s.index_copy_(0, index[new], u[new])
            self.bank_t.index_copy_(0, index[new], v[new])
            seen = ~new
            bank_update(self.bank_s, index[seen], u[seen], self.bank_momentum)
            bank_update(self.bank_t, index[seen], v[seen], self.bank_momentum)
        else:
            bank_update(self.bank_s, index, u, self.bank_momentum)
            bank_update(self.bank_t, index, v, self.bank_momentum)
        self.bank_labels.index_copy_(0, index, y.to(self.bank_labels.dtype))

    def after_step(self, student: nn.Module) -> None:
        """Write the pending batch into both banks, then the EMA of T and g_t; step += 1."""
        if self._pending is not None:
            self._write_banks(*self._pending)
            self._pending = None
        alpha = ema_alpha(int(self.step), self.ema_max, self.ema_warmup)
        if self._pairs is None or self._pairs[0]() is not student:
            t_keys, s_params = paired_parameters(self.teacher, student)
            h_keys, h_params = paired_parameters(self.embed_t, self.embed_s)
            self._pairs = (weakref.ref(student), (t_keys + h_keys, s_params + h_params))
        momentum_update(*self._pairs[1], alpha)
        if self.ema_buffers:
            _ema_buffers(self.teacher, student, alpha)
        self.step += 1


@torch.no_grad()
def _ema_buffers(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    student_buffers = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        s = student_buffers.get(name)
        if s is None or s.shape != b.shape:
            continue
        if b.is_floating_point():
            b.mul_(alpha).add_(s.to(b.dtype), alpha=1.0 - alpha)
        else:
            b.copy_(s)


def check_same_architecture(teacher: nn.Module, student: nn.Module) -> None:
    """CRCKD's mean teacher follows the student by EMA: refuse a teacher of another backbone."""
    d_t, d_s = feature_dim(teacher), feature_dim(student)
    if type(teacher) is not type(student) or d_t != d_s:
        raise ValueError(
            "CRCKD's mean teacher is an EMA of the student: it needs teacher and student of the "
            f"same architecture (got {type(teacher).__name__}/{d_t} vs "
            f"{type(student).__name__}/{d_s})")
    try:
        keys, _ = paired_parameters(teacher, student)
    except ValueError:
        keys = []
    head = len(list(student.get_classifier().parameters()))
    if len(keys) < len(list(student.parameters())) - head:
        raise ValueError(
            "CRCKD's mean teacher needs teacher and student backbones with identical "
            "parameters (names and shapes); only the classifier may differ")


def random_flip_rot90(x: torch.Tensor) -> torch.Tensor:
    """A second view for the teacher: per image a random horizontal flip and k·90° rotation.

    Label-preserving for tissue tiles; needs square images (rotation keeps H×W).
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError("random_flip_rot90 needs square images")
    n = x.shape[0]
    flip = torch.rand(n, device=x.device) < 0.5
    out = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    k = torch.randint(4, (n,), device=x.device)
    for r in range(1, 4):
        sel = k == r
        if bool(sel.any()):
            out[sel] = torch.rot90(out[sel], r, dims=(-2, -1))
    return out
