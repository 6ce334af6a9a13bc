"""Loss pieces shared by the objectives: temperature-scaled KL distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0
               ) -> torch.Tensor:
    """KL(softmax(z_t/T) || softmax(z_s/T)) · T², batch mean (Hinton et al.)."""
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    p_t = F.softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * T * T
