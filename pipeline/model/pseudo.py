"""Pseudo-anomalies from normal images only, with exact masks.

Pixel space: a rectangle of the image replaced by a patch cut from elsewhere in the same image
(CutPaste-like), by Gaussian noise, or by a synthetic texture; the mask is exactly the set of pixels
whose value changed. Latent space: a rectangle of patch tokens marked for noise (applied inside the
visual tower), the mask is that rectangle at pixel resolution.
"""
from __future__ import annotations

import torch

KINDS = ("paste", "noise", "texture")


def _box(gen: torch.Generator, size: int, lo: float = 0.08, hi: float = 0.3) -> tuple[int, int, int, int]:
    h = int(size * (lo + (hi - lo) * torch.rand(1, generator=gen).item()))
    w = int(size * (lo + (hi - lo) * torch.rand(1, generator=gen).item()))
    h, w = max(h, 2), max(w, 2)
    y = int(torch.randint(0, size - h + 1, (1,), generator=gen))
    x = int(torch.randint(0, size - w + 1, (1,), generator=gen))
    return y, x, h, w


def pixel_anomaly(img: torch.Tensor, kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """img [C, S, S] -> (perturbed image, mask [S, S] float with 1 exactly where a pixel changed)."""
    c, size, _ = img.shape
    y, x, h, w = _box(gen, size)
    out = img.clone()
    if kind == "paste":
        sy, sx, _, _ = _box(gen, size)
        sy, sx = min(sy, size - h), min(sx, size - w)
        patch = img[:, sy:sy + h, sx:sx + w].flip(-1)  # flipped so it cannot coincide with the target
        out[:, y:y + h, x:x + w] = patch * (0.7 + 0.6 * torch.rand(1, generator=gen).item())
    elif kind == "noise":
        out[:, y:y + h, x:x + w] = img[:, y:y + h, x:x + w] + torch.randn(c, h, w, generator=gen) * img.std()
    elif kind == "texture":
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        freq = 0.3 + torch.rand(1, generator=gen).item()
        stripes = torch.sin((yy + xx) * freq)  # [h, w]
        colour = torch.randn(c, 1, 1, generator=gen)
        out[:, y:y + h, x:x + w] = colour * (1 + stripes)
    else:
        raise ValueError(f"unknown pseudo-anomaly kind {kind!r}; choose from {KINDS}")
    mask = (out != img).any(0).float()  # exactly the changed pixels
    return out, mask


def latent_region(grid: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A random rectangle of the patch grid: bool [h * w]."""
    gh, gw = grid
    m = torch.zeros(gh, gw, dtype=torch.bool)
    h = int(torch.randint(1, max(2, gh // 3 + 1), (1,), generator=gen))
    w = int(torch.randint(1, max(2, gw // 3 + 1), (1,), generator=gen))
    y = int(torch.randint(0, gh - h + 1, (1,), generator=gen))
    x = int(torch.randint(0, gw - w + 1, (1,), generator=gen))
    m[y:y + h, x:x + w] = True
    return m.flatten()


def latent_mask_pixels(region: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """Patch-grid region [h * w] -> pixel mask [size, size] (each patch covers size/h x size/w pixels)."""
    m = region.view(1, 1, *grid).float()
    return torch.nn.functional.interpolate(m, size=(size, size), mode="nearest")[0, 0]
