"""The distillation losses of modular training (docs/modular.md, "Losses")."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def logit_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                       labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over the vocabulary
    and averaged over the positions whose label is not -100 (Hinton et al.: the T^2 keeps
    the gradient's scale independent of T). Computed in fp32."""
    vocab = student.shape[-1]
    s = F.log_softmax(student.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, vocab) / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(dim=-1)
    if labels is not None:
        keep = (labels.reshape(-1) != -100).float()
        return temperature ** 2 * (per_token * keep).sum() / keep.sum().clamp_min(1)
    return temperature ** 2 * per_token.mean()


def hidden_distillation(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Optional[torch.Tensor]:
    """Mean over (student, teacher) residual-stream pairs of their elementwise mean squared
    error; None when there is no pair (an assembly without modules)."""
    if not pairs:
        return None
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in pairs]).mean()
