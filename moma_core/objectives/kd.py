"""Vanilla knowledge distillation (Hinton et al. 2015): c·CE + d·KL(T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moma_core.method_config import ObjectiveConfig
from moma_core.models import features_and_logits
from moma_core.objective_registry import register
from moma_core.objectives.base import BuildInputs, TeacherObjective


@register
class VanillaKD(TeacherObjective):
    """Hinton KD: c·CE + d·KL(T). Needs the teacher to share the student's label space."""

    name = "kd"
    order = 20
    needs_teacher = True
    needs_index = False
    same_task_only = True
    dp_compatible = True
    needs_public_keys = False
    loss_terms = ("ce", "kl")
    report_terms = ()

    def __init__(self, teacher: nn.Module, cfg: ObjectiveConfig, same_task: bool) -> None:
        if not same_task:
            raise ValueError("vanilla KD needs a teacher of the same task (same classes)")
        super().__init__(teacher, cfg, same_task)

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, inputs: BuildInputs) -> VanillaKD:
        assert inputs.teacher is not None  # build_objective: needs_teacher
        return cls(inputs.teacher, cfg, bool(inputs.same_task))

    def loss(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, z_s = features_and_logits(student, x)
        with torch.no_grad():
            _, z_t = features_and_logits(self.teacher, x)
        ce = F.cross_entropy(z_s, y)
        kl = self._kl(z_s, z_t)
        total = self.cfg.ce_weight * ce + self.cfg.kl_weight * kl
        return total, {"ce": ce.detach(), "kl": kl.detach()}
