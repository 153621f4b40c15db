"""Patch-level anomaly evidence -> pixel anomaly map and image score."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian, radius 4 sigma (PromptAD/PatchCore smooth with sigma 4)."""
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def patch_scores_to_map(patch_scores: torch.Tensor, grid: tuple[int, int], size: int, sigma: float = 4.0) -> torch.Tensor:
    """[B, h*w] patch scores -> [B, size, size] map: bilinear upsampling then separable Gaussian blur."""
    b = patch_scores.shape[0]
    m = patch_scores.reshape(b, 1, grid[0], grid[1]).float()  # [B, 1, h, w]
    m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)  # [B, 1, S, S]
    return blur(m[:, 0], sigma)  # [B, S, S]


def blur(amap: torch.Tensor, sigma: float) -> torch.Tensor:
    """[B, S, S] separable Gaussian smoothing (replicate padding); sigma <= 0 leaves it as is."""
    if sigma <= 0:
        return amap
    k = gaussian_kernel(sigma).to(amap.device)
    r = k.numel() // 2
    m = amap.unsqueeze(1)
    m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return m[:, 0]


def pixel_map(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Decoder logits [B, 1, h, w] -> anomaly probability map [B, size, size]."""
    return torch.sigmoid(F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False))[:, 0]


def harmonic_fusion(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Harmonic mean of two non-negative anomaly maps (AnoPLe fuses text and memory-bank maps so)."""
    return 2.0 * a * b / (a + b + eps)


def image_score(amap: torch.Tensor) -> torch.Tensor:
    """[B, S, S] -> [B]: the map's maximum (the strongest local evidence decides the image)."""
    return amap.flatten(1).max(dim=1).values
