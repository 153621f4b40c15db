"""AnoPLe's training objective: L = L_pixel (focal + dice) + L_img + L_align.

Each loss can be one data-parallel worker's part of a batch split over workers (`Split`): it then returns
this worker's share of the whole batch's loss, so that the workers' shares sum to the loss one worker computes
on the whole batch, and so do their gradients (summed by an all-reduce). That is what makes a fit on W workers
train the same prompts as one worker, to float rounding."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class Split(NamedTuple):
    """This worker's part of a batch of views split over data-parallel workers (one worker: no Split)."""
    share: float                                  # this worker's views / the batch's views (the shares sum to 1)
    pool: Callable[[torch.Tensor], torch.Tensor]  # the tensor summed over all workers (an all-reduce)


def _mean(x: torch.Tensor, split: Split | None) -> torch.Tensor:
    """The batch mean of a per-element loss; a worker's share of it when the batch is split. Exact because every
    view has as many elements (pixels) as every other: mean_local * n_local / n_all = sum_local / n_all."""
    return x.mean() if split is None else x.mean() * split.share


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               split: Split | None = None) -> torch.Tensor:
    """Binary focal loss, mean over pixels: -(1 - p_t)^gamma log p_t."""
    logp = F.logsigmoid(logits)
    lognp = F.logsigmoid(-logits)
    logpt = target * logp + (1 - target) * lognp
    return _mean(-(1 - logpt.exp()) ** gamma * logpt, split)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
              split: Split | None = None) -> torch.Tensor:
    """1 - soft Dice over the whole batch. Pooled, not per image: a per-image Dice of an all-normal view
    (empty mask) is ~1 unless the map is zero everywhere, which would drown the defect signal.

    Split over workers, the pooled Dice 1 - N/D (N = 2 sum(p t) + eps, D = sum(p) + sum(t) + eps) needs every
    worker's sums: they are all-reduced (no gradient through the collective), and this worker returns
    share * (1 - N/D) plus a term of value 0 whose gradient is the whole loss's gradient w.r.t. this worker's
    p: dL/dp_i = -(2 t_i D - N) / D^2, i.e. the gradient of -(2 I_w D - N U_w) / D^2 with N, D held constant
    (I_w, U_w: this worker's sums)."""
    p, t = torch.sigmoid(logits).float(), target.float()
    inter, union = (p * t).sum(), p.sum() + t.sum()
    if split is None:
        return 1 - (2 * inter + eps) / (union + eps)
    whole = split.pool(torch.stack([inter, union]).detach())  # [2] the batch's sums
    n, d = 2 * whole[0] + eps, whole[1] + eps
    local = -(2 * inter * d - n * union) / d ** 2
    return split.share * (1 - n / d) + (local - local.detach())


def image_loss(image_logits: torch.Tensor, labels: torch.Tensor, split: Split | None = None) -> torch.Tensor:
    """L_img: cross-entropy of [normal, abnormal] text similarities of the image embedding."""
    return _mean(F.cross_entropy(image_logits, labels.long(), reduction="none"), split)


def align_loss(z0: torch.Tensor, s: torch.Tensor, split: Split | None = None) -> torch.Tensor:
    """L_align = 1 - <z_0, s> on unit vectors, averaged over the batch."""
    return _mean(1 - (F.normalize(z0, dim=-1) * F.normalize(s, dim=-1)).sum(-1), split)
