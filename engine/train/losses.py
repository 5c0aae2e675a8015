"""Losses of a sandwich step: label-smoothed CE for the max net, in-place KD for the others."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_labels(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / τ) of the max net, detached: (N, classes)."""
    return F.softmax(teacher_logits.detach().float() / temperature, dim=-1)


def kd_loss(student_logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ² · soft-target cross-entropy of student_logits / τ against `targets` (mean over the batch).
    Differs from KL by the teacher's entropy, a constant: same gradient."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(targets * log_p).sum(-1).mean() * temperature ** 2
