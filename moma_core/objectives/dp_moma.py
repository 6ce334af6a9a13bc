"""DP-MoMA: a MoMA variant whose loss is a sum of per-sample terms, as DP-SGD needs.

MoMA as published (:class:`moma_core.objectives.MoMA`) breaks sample-level DP-SGD twice
(docs: METHOD.md, "Federated setting"): its FIFO queue carries keys of earlier private images
into later samples' gradients, and its multi-head attention takes the samples of the batch as
tokens, so one sample's query mixes every image of the batch. :class:`DPMoMA` keeps MoMA's
pieces — CE, KL to the teacher (same task), a contrastive term against the teacher's keys with a
trainable projection head and attention on the query side — but closes both channels:

* negatives: a fixed set of keys computed once, by the *frozen* teacher, from non-private
  (public or synthetic) images (:func:`public_queue`); nothing is ever enqueued;
* positive of sample i: the frozen teacher's key of x_i alone;
* attention: per sample — the query of x_i attends over the public keys
  (:class:`QueueAttention`, nn.Linear layers only, so Opacus computes its per-sample
  gradients), or no attention at all.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from moma_core.heads import projection_head
from moma_core.method_config import ObjectiveConfig
from moma_core.models import feature_dim, features_and_logits
from moma_core.objective_registry import register
from moma_core.objectives.base import BuildInputs, TeacherObjective

DP_ATTENTION = ("queue", "none")
_UNIT_NORM_TOLERANCE = 1e-3


class QueueAttention(nn.Module):
    """Multi-head attention of each sample's query over a fixed set of keys (no batch mixing).

    For a query x_i (D) and keys P (K×D), head h computes, as standard multi-head attention with
    queries from x and keys and values from P::

        a_h = softmax_j( (W_q,h x_i + b_q,h) · (W_k,h p_j) / sqrt(D/H) )
        o_h = W_v,h (Σ_j a_h,j p_j) + b_v,h
        out = W_o [o_1 … o_H] + b_o

    The key bias of the textbook form adds the same number to every score of a row and
    cancels in the softmax, so it is left out; the value map is applied after the weighted sum
    (it is linear, and the weights sum to 1, so the bias commutes too). Written this way every
    trainable layer is an ``nn.Linear`` whose input has the batch as first dimension —
    ``q`` on x_i, ``key_maps[h]`` (W_k,hᵀ) on the query's head slice, ``value_maps[h]`` on the
    context of sample i — so Opacus' per-sample gradients apply, and output i depends on x_i and
    the (constant) keys only. No residual, no normalisation, as MoMA's attention.
    """

    def __init__(self, dim: int = 512, num_heads: int = 4, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.key_maps = nn.ModuleList(
            nn.Linear(self.head_dim, dim, bias=False) for _ in range(num_heads))
        self.value_maps = nn.ModuleList(
            nn.Linear(dim, self.head_dim, bias=qkv_bias) for _ in range(num_heads))
        self.proj = nn.Linear(dim, dim)

    def attention_matrix(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, heads, K) of queries ``x`` (B, D) over ``keys`` (K, D)."""
        q = self.q(x).reshape(x.shape[0], self.num_heads, self.head_dim)
        return torch.stack([self._weights(q[:, h], h, keys) for h in range(self.num_heads)], 1)

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q = self.q(x).reshape(x.shape[0], self.num_heads, self.head_dim)
        heads = []
        for h in range(self.num_heads):
            context = self._weights(q[:, h], h, keys) @ keys  # (B, D)
            heads.append(self.value_maps[h](context))  # (B, D/H)
        return self.proj(torch.cat(heads, dim=1))

    def _weights(self, q_h: torch.Tensor, h: int, keys: torch.Tensor) -> torch.Tensor:
        return ((self.key_maps[h](q_h) @ keys.t()) * self.scale).softmax(dim=-1)  # (B, K)


def teacher_keys(teacher: nn.Module, x: torch.Tensor, key_head: nn.Module | None = None
                 ) -> torch.Tensor:
    """L2-normalised keys of the images ``x``: ``key_head(f_T(x))``, or ``f_T(x)`` itself without
    a key head. No gradient; the teacher and the head must be in eval mode (each key then
    depends on its own image only)."""
    with torch.no_grad():
        f_t, _ = features_and_logits(teacher, x)
        return _keys_of_features(f_t, key_head)


def _keys_of_features(f_t: torch.Tensor, key_head: nn.Module | None) -> torch.Tensor:
    with torch.no_grad():
        k = key_head(f_t) if key_head is not None else f_t
        return F.normalize(k.float(), dim=1)


def public_queue(teacher: nn.Module, images: torch.Tensor | Dataset,
                 key_head: nn.Module | None = None, batch_size: int = 256) -> torch.Tensor:
    """The negatives of :class:`DPMoMA`: keys of *non-private* ``images`` through the frozen
    teacher (K×D, rows L2-normalised, on the teacher's device).

    ``images`` is an (N, 3, H, W) tensor or a data set whose items are an image or a tuple
    starting with the image (labels are ignored), already normalised as the teacher expects.
    Give the same ``key_head`` (or none) to :class:`DPMoMA`. The teacher and the head are used
    in eval mode and restored to their modes afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}: give at least 1")
    device = next(teacher.parameters()).device
    modules = [m for m in (teacher, key_head) if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    keys = []
    try:
        if isinstance(images, torch.Tensor):
            batches = images.split(batch_size)
        else:
            batches = (b[0] if isinstance(b, (list, tuple)) else b
                       for b in DataLoader(images, batch_size=batch_size, shuffle=False))
        for x in batches:
            keys.append(teacher_keys(teacher, x.to(device), key_head))
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    if not keys:
        raise ValueError("public_queue: no public images given")
    return torch.cat(keys)


@register
class DPMoMA(TeacherObjective):
    """MoMA for sample-level DP-SGD: frozen teacher, public negatives, per-sample attention.

    Symbols as in :class:`moma_core.objectives.MoMA`: student S with query head g_s and query
    attention A_q (:class:`QueueAttention`, or none with ``cfg.dp_attention = "none"``); frozen
    teacher T with a frozen key head g_t (``key_head``; none: the teacher's pooled feature
    itself); P (K×D) the public keys of :func:`public_queue`. For a sample (x_i, y_i)::

        f_s, z_s = S(x_i);   f_t, z_t = T(x_i)               (T in eval mode, no gradient)
        k_i = normalise(g_t(f_t));   q_i = A_q(g_s(f_s), P)
        ℓ_i = c·CE(z_s, y_i) + d·KL_T(z_t ‖ z_s) + b·CE([q_i·k_i, q_i·Pᵀ]/τ, 0)

    and the loss of a batch is the mean of the ℓ_i. ℓ_i is a function of x_i, y_i, the trainable
    parameters and constants (T, g_t, P) only: no batch statistics (the student must be free of
    BatchNorm, see :func:`moma_core.privacy.dp_sgd.make_private_compatible`; T keeps its
    BatchNorm in eval mode, i.e. fixed statistics), no token mixing across the batch, and no
    state carried between steps — :meth:`after_step` does nothing and P never changes. So the
    per-sample gradient that DP-SGD clips is the whole influence of sample i on the update.

    Trainable: the student, g_s and A_q. ``teacher_update``, ``queue_size``, ``queue_keys``,
    ``attention_keys``, ``key_head_init`` and ``momentum`` of the config do not apply (the
    teacher is never updated, K is the number of public keys). With ``nce_weight = 0`` g_s and
    A_q are frozen (unused).

    **What the ε of DP-SGD then protects.** DP-SGD (Opacus, Poisson sampling, per-sample
    clipping, Gaussian noise, RDP accounting) run with this objective gives (ε, δ)-DP with
    respect to adding or removing *one training example of this site's data set*: one patch
    (image, label) as the data loader yields it. If a patient contributes many patches, the
    guarantee for the patient is that of a group of that size (roughly ε·n, δ·n·e^{ε(n−1)}),
    unless the data set is built with one unit per patient (patient-level sampling and
    clipping of the patient's summed gradient), in which case the unit is the patient. It covers
    everything that leaves the training loop — the sequence of student and head parameters
    (hence every student update sent to the federation, and any model later released from them),
    under the usual assumption that the adversary sees every iterate. It is accounted per
    :func:`moma_core.train.train_local` call; a site's total over rounds is the composition of
    its calls (the privacy ledger).

    What it does **not** protect: the teacher (trained elsewhere; its source data is outside
    this guarantee) and the public images behind P (public by assumption — if they were derived
    from private data, e.g. a generator trained on it, the guarantee does not cover that);
    anything computed from private images *outside* the DP optimiser — training losses and
    metrics reported per round, evaluation on private validation data, the number of examples,
    which are released without noise; hyper-parameter search on the private data; the site's
    participation itself, or a whole site's (or hospital's) contribution — that needs
    client-level DP on the aggregated updates. Augmentation does not change the unit: several
    views of a patch are still one example.
    """

    name = "dp-moma"
    order = 50
    needs_teacher = True
    needs_index = False
    same_task_only = False
    dp_compatible = True
    needs_public_keys = True
    loss_terms = ("ce", "kl", "nce")
    report_terms = ()

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: ObjectiveConfig,
                 same_task: bool, public_keys: torch.Tensor,
                 key_head: nn.Module | None = None) -> None:
        super().__init__(teacher, cfg, same_task)
        if cfg.dp_attention not in DP_ATTENTION:
            raise ValueError(f"dp_attention must be one of {DP_ATTENTION}")
        keys = _check_keys(public_keys)
        emb = keys.shape[1]
        self.key_head = copy.deepcopy(key_head) if key_head is not None else None
        if self.key_head is not None:
            self.key_head.requires_grad_(False)
            self.key_head.eval()
        elif feature_dim(self.teacher) != emb:
            raise ValueError(
                f"public keys of dimension {emb} but the teacher's feature has "
                f"{feature_dim(self.teacher)}: compute them with public_queue(teacher, images) "
                "and pass the same key_head (or none) here"
            )
        self.register_buffer("public_keys", keys.detach().clone())
        d_s = feature_dim(student)
        if cfg.head == "none" and d_s != emb:
            raise ValueError(f"head 'none' needs the student's feature dimension ({d_s}) to "
                             f"equal the key dimension ({emb})")
        self.proj_q = projection_head(d_s, emb, cfg.head)
        _no_inplace(self.proj_q)  # Opacus' backward hooks refuse in-place ops on their outputs
        self.attn_q = QueueAttention(emb, cfg.num_heads) if cfg.dp_attention == "queue" else None
        self.use_nce = cfg.nce_weight != 0
        if not self.use_nce:  # unused heads get no gradient; DP-SGD needs one for each parameter
            self.proj_q.requires_grad_(False)
            if self.attn_q is not None:
                self.attn_q.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, inputs: BuildInputs) -> DPMoMA:
        assert inputs.teacher is not None  # build_objective: needs_teacher
        if inputs.public_keys is None:
            raise ValueError("objective 'dp-moma' needs public_keys: the frozen teacher's keys "
                             "of non-private images (moma_core.privacy.dp_moma.public_queue)")
        return cls(inputs.teacher, inputs.student, cfg, bool(inputs.same_task),
                   inputs.public_keys)

    @classmethod
    def from_public_images(cls, teacher: nn.Module, student: nn.Module, cfg: ObjectiveConfig,
                           same_task: bool, images: torch.Tensor | Dataset,
                           key_head: nn.Module | None = None) -> DPMoMA:
        """Build the objective with the keys of the public ``images`` (:func:`public_queue`)."""
        keys = public_queue(teacher, images, key_head)
        return cls(teacher, student, cfg, same_task, keys, key_head)

    def train(self, mode: bool = True) -> DPMoMA:
        super().train(mode)
        if self.key_head is not None:
            self.key_head.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def query(self, f_s: torch.Tensor) -> torch.Tensor:
        """q = A_q(g_s(f_s)) of student features (B, d_s), per sample."""
        q = self.proj_q(f_s)
        return self.attn_q(q, self.public_keys) if self.attn_q is not None else q

    def loss(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        f_s, z_s = features_and_logits(student, x)
        with torch.no_grad():
            f_t, z_t = features_and_logits(self.teacher, x)
        ce = F.cross_entropy(z_s, y)
        kl = self._kl(z_s, z_t)
        total = cfg.ce_weight * ce + cfg.kl_weight * kl
        parts = {"ce": ce.detach(), "kl": kl.detach()}
        if self.use_nce:
            q = self.query(f_s) / cfg.nce_temperature
            k = _keys_of_features(f_t, self.key_head).to(q.dtype)
            keys = self.public_keys.to(q.dtype)
            logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ keys.t()], dim=1)
            nce = F.cross_entropy(logits, torch.zeros_like(y))
            total = total + cfg.nce_weight * nce
            parts["nce"] = nce.detach()
        return total, parts

    def after_step(self, student: nn.Module) -> None:
        """Nothing: the negatives are the public keys, no key of a private image is kept."""


def _check_keys(keys: torch.Tensor) -> torch.Tensor:
    if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[0] < 1:
        raise ValueError("public_keys must be a non-empty (K, D) tensor (see public_queue)")
    if not torch.isfinite(keys).all():
        raise ValueError("public_keys contain non-finite values")
    norms = keys.float().norm(dim=1)
    if (norms - 1).abs().max() > _UNIT_NORM_TOLERANCE:
        raise ValueError("public_keys rows must be L2-normalised (see public_queue)")
    return keys.float()


def _no_inplace(module: nn.Module) -> None:
    for m in module.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
