"""The baseline without a teacher: c·CE on the site's labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moma_core.method_config import ObjectiveConfig
from moma_core.models import features_and_logits
from moma_core.objective_registry import register
from moma_core.objectives.base import BuildInputs, Objective


@register
class CrossEntropyOnly(Objective):
    """Baseline without a teacher: c·CE."""

    name = "ce"
    order = 10
    needs_teacher = False
    needs_index = False
    same_task_only = False
    dp_compatible = True
    needs_public_keys = False
    loss_terms = ("ce",)
    report_terms = ()

    def __init__(self, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, inputs: BuildInputs) -> CrossEntropyOnly:
        return cls(cfg)

    def loss(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, z_s = features_and_logits(student, x)
        ce = F.cross_entropy(z_s, y)
        return self.cfg.ce_weight * ce, {"ce": ce.detach()}
