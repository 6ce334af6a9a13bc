"""Settings of the method layer: the objective's and local training's, as plain dataclasses.

Kept apart from the modules that use them (:mod:`moma_core.objectives`, :mod:`moma_core.train`)
so that reading or validating settings imports no torch. Each default here is the project's one
default for that setting; the federation's settings tree takes them from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from moma_core import objective_registry

#: the objectives the commands offer (moma_core.objective_registry, built in: ce, kd, moma,
#: crckd); DP_OBJECTIVES: those that also need the frozen teacher's keys of public images
#: (dp-moma, for sample-level DP-SGD), which only the federation wires. The settings and
#: ObjectiveConfig accept every registered objective.
OBJECTIVES = tuple(n for n, d in objective_registry.declarations().items()
                   if not d.needs_public_keys)
DP_OBJECTIVES = tuple(n for n, d in objective_registry.declarations().items()
                      if d.needs_public_keys)
#: the part of the student DP-SGD trains (moma_core.privacy.dp_sgd.freeze_for_dp): the
#: classifier (a linear probe on the frozen backbone), the last stage and the classifier, or all
DP_TRAINABLE = ("all", "last-stage", "head")
#: MoMA's batch attention variants (``ObjectiveConfig.moma_attention``)
MOMA_ATTENTIONS = ("reference", "residual")
#: training images of a synthetic site when none is given (its validation split is a quarter
#: of it): the commands' --n, a site's ``n`` and the demo teacher's source task
SYNTHETIC_N = 800


@dataclass
class ObjectiveConfig:
    """Weights and hyper-parameters (defaults: the MoMA reference code)."""

    kind: str = "moma"
    ce_weight: float = 1.0  # c
    kl_weight: float = 1.0  # d (forced to 0 when the tasks differ)
    nce_weight: float = 1.0  # b
    kd_temperature: float = 4.0  # T
    feat_dim: int = 512
    head: str = "mlp"
    num_heads: int = 4
    # K: 4096, not the reference's 16384. A site holds a few thousand patches: with 16384 most
    # keys in the queue were encoded many hundreds of steps earlier by an older key encoder
    # (and repeat the same images), and the B×(K+1) logits dominate a small model's step.
    queue_size: int = 4096
    nce_temperature: float = 0.15  # τ
    momentum: float = 0.999  # m
    attention_keys: str = "reference"  # "reference" | "trained"
    teacher_update: str = "momentum"  # "momentum" | "frozen"
    key_head_init: str = "copy"  # g_t: "copy" of g_s, or "independent" (the reference)
    # what enters the queue: "reference" A_enq(k̂) (the authors' code: negatives through another
    # random map than the positives), or "keys" k = A_k(k̂) itself (MoCo's rule)
    queue_keys: str = "reference"
    # teacher logits for KL: "before-update" (the reference: a second teacher forward per step
    # when KL is on) or "after-update" (one forward; z_t from the just-updated teacher)
    kl_teacher: str = "before-update"
    # MoMA's batch attention: "reference" (the authors' code: q = A_q(x), k = A_k(k̂), three
    # separate maps, no residual: its NCE term falls to 0) or "residual" (the default):
    # q = normalize(x + A_q(x)) with A_q's output projection zero-initialised, k = normalize(k̂ +
    # A_k(k̂)) with A_k the momentum copy of A_q, and the queue receives k itself (see
    # moma_core.objectives.moma.MoMA; docs/benchmarks.md: no accuracy lost, a term that carries
    # each image's teacher key)
    moma_attention: str = "residual"
    # dp-moma's query attention: "queue" (each sample's query attends over the public keys) or
    # "none"; never across the samples of a batch
    dp_attention: str = "queue"

    def __post_init__(self) -> None:
        if self.kind not in objective_registry.names():
            raise ValueError(f"unknown objective {self.kind!r}; choose one of "
                             f"{objective_registry.names()}")
        if self.attention_keys not in ("reference", "trained"):
            raise ValueError("attention_keys must be 'reference' or 'trained'")
        if self.teacher_update not in ("momentum", "frozen"):
            raise ValueError("teacher_update must be 'momentum' or 'frozen'")
        if self.kl_teacher not in ("before-update", "after-update"):
            raise ValueError("kl_teacher must be 'before-update' or 'after-update'")
        if self.queue_keys not in ("reference", "keys"):
            raise ValueError("queue_keys must be 'reference' or 'keys'")
        if self.key_head_init not in ("copy", "independent"):
            raise ValueError("key_head_init must be 'copy' or 'independent'")
        if self.moma_attention not in MOMA_ATTENTIONS:
            raise ValueError(f"moma_attention must be one of {MOMA_ATTENTIONS}")
        if self.moma_attention == "residual" and self.attention_keys == "trained":
            raise ValueError("attention_keys = 'trained' is for the reference attention: with "
                             "moma_attention = 'residual' A_k is the momentum copy of A_q")
        if self.dp_attention not in ("queue", "none"):
            raise ValueError("dp_attention must be 'queue' or 'none'")
        if self.queue_size < 1 or self.feat_dim < 1 or self.num_heads < 1:
            raise ValueError("queue size, feature dimension and heads must be at least 1")
        if not 0 <= self.momentum < 1 or self.nce_temperature <= 0 or self.kd_temperature <= 0:
            raise ValueError("momentum must be in [0, 1), temperatures positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ObjectiveConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


OPTIMIZERS = ("sgd", "adamw")
#: the local batch size of a federation's sites and of moma-distill (run setting batch-size)
BATCH_SIZE = 32


def cosine_factor(t: float, floor: float = 1e-3) -> float:
    """The learning-rate factor of a cosine from 1 (t = 0) to ``floor`` (t = 1).

    The one schedule of the project: per epoch within local training (the reference), and
    over rounds in a federation (``lr-schedule = "cosine"``).
    """
    t = min(max(t, 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class TrainConfig:
    """Local optimisation settings (defaults: the MoMA reference, SGD + cosine)."""

    epochs: int = 1
    max_steps: int | None = None  # stop after this many steps (over all epochs)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # "sgd" | "adamw"
    cosine: bool = True  # cosine decay per epoch to lr·1e-3
    proximal_mu: float = 0.0  # FedProx: μ/2·‖w − w_global‖²
    amp: bool = False  # mixed precision on CUDA
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs {self.epochs}: give at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max steps {self.max_steps}: give at least 1 (or none)")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"learning rate {self.lr}: give a positive number")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: choose one of {OPTIMIZERS}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1 or self.proximal_mu < 0:
            raise ValueError("weight decay and proximal mu must be >= 0, momentum in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


