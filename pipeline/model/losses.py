"""AnoPLe's training objective: L = L_pixel (focal + dice) + L_img + L_align."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss, mean over pixels: -(1 - p_t)^gamma log p_t."""
    logp = F.logsigmoid(logits)
    lognp = F.logsigmoid(-logits)
    logpt = target * logp + (1 - target) * lognp
    return (-(1 - logpt.exp()) ** gamma * logpt).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch. Pooled, not per image: a per-image Dice of an all-normal view
    (empty mask) is ~1 unless the map is zero everywhere, which would drown the defect signal."""
    p, t = torch.sigmoid(logits), target
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def image_loss(image_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_img: cross-entropy of [normal, abnormal] text similarities of the image embedding."""
    return F.cross_entropy(image_logits, labels.long())


def align_loss(z0: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """L_align = 1 - <z_0, s> on unit vectors, averaged over the batch."""
    return (1 - (F.normalize(z0, dim=-1) * F.normalize(s, dim=-1)).sum(-1)).mean()
