"""Pseudo-anomalies from normal images only, with exact masks.

Pixel space: a region of the image replaced by pixels from elsewhere in the same image (CutPaste-like), by
Gaussian noise, or by a synthetic texture; or (DRAEM-style, "perlin") blended with a foreign source: a smooth
colour field, or a rolled and flipped copy of the image itself (no external texture set is available offline).
The region is an irregular blob of thresholded smooth noise (shape "irregular", DRAEM's shapes: real defects
have no straight edges for a decoder to learn) or an axis-aligned rectangle (shape "box", the earlier wiring);
"perlin" is always a blob. The mask is exactly the set of pixels whose value changed.
Latent space: a region of patch tokens marked for noise (applied inside the visual tower): a blob of the patch
grid, or a rectangle; the mask is that region at pixel resolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.model.config import PSEUDO_KINDS as KINDS


def _box(gen: torch.Generator, size: int, lo: float = 0.08, hi: float = 0.3) -> tuple[int, int, int, int]:
    h = int(size * (lo + (hi - lo) * torch.rand(1, generator=gen).item()))
    w = int(size * (lo + (hi - lo) * torch.rand(1, generator=gen).item()))
    h, w = max(h, 2), max(w, 2)
    y = int(torch.randint(0, size - h + 1, (1,), generator=gen))
    x = int(torch.randint(0, size - w + 1, (1,), generator=gen))
    return y, x, h, w


SHAPES = ("irregular", "box")


def blob(size: int, gen: torch.Generator, lo: float = 0.01, hi: float = 0.09) -> torch.Tensor:
    """An irregular region [S, S] bool: the top lo..hi share of a smooth noise field (one or a few blobs)."""
    return perlin_mask(size, gen, min_frac=lo, max_frac=hi)


def pixel_anomaly(img: torch.Tensor, kind: str, gen: torch.Generator,
                  shape: str = "box") -> tuple[torch.Tensor, torch.Tensor]:
    """img [C, S, S] -> (perturbed image, mask [S, S] float with 1 exactly where a pixel changed). `shape` is the
    region of paste / noise / texture ("irregular" blob or "box"); perlin is always a blob."""
    if shape not in SHAPES:
        raise ValueError(f"pseudo-anomaly shape {shape!r} not in {SHAPES}")
    c, size, _ = img.shape
    if shape == "irregular" and kind in ("paste", "noise", "texture"):
        return _in_blob(img, kind, gen)
    y, x, h, w = _box(gen, size)
    out = img.clone()
    if kind == "paste":
        sy, sx, _, _ = _box(gen, size)
        sy, sx = min(sy, size - h), min(sx, size - w)
        patch = img[:, sy:sy + h, sx:sx + w].flip(-1)  # flipped so it cannot coincide with the target
        out[:, y:y + h, x:x + w] = patch * (0.7 + 0.6 * torch.rand(1, generator=gen).item())
    elif kind == "noise":
        out[:, y:y + h, x:x + w] = img[:, y:y + h, x:x + w] + torch.randn(c, h, w, generator=gen) * img.std()
    elif kind == "perlin":
        region = perlin_mask(size, gen)  # [S, S] bool, irregular blobs
        if torch.rand(1, generator=gen).item() < 0.5:  # source: smooth colour field
            source = smooth_noise(size, gen, channels=c) * 2 * img.std() + img.mean()
        else:  # source: the same product elsewhere (rolled, flipped)
            shift = [int(torch.randint(size // 4, 3 * size // 4, (1,), generator=gen)) for _ in range(2)]
            source = torch.roll(img, shifts=shift, dims=(1, 2)).flip(1)
        beta = 0.8 * torch.rand(1, generator=gen).item()  # DRAEM's opacity: beta * image + (1 - beta) * source
        out = torch.where(region, beta * img + (1 - beta) * source, img)
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


def _in_blob(img: torch.Tensor, kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """paste / noise / texture inside an irregular blob: the same sources as the boxes, the region DRAEM's."""
    c, size, _ = img.shape
    region = blob(size, gen)  # [S, S] bool
    if kind == "paste":  # the product elsewhere, mirrored, brightness-jittered
        shift = [int(torch.randint(size // 4, 3 * size // 4, (1,), generator=gen)) for _ in range(2)]
        source = torch.roll(img, shifts=shift, dims=(1, 2)).flip(-1) * (0.7 + 0.6 * torch.rand(1, generator=gen).item())
    elif kind == "noise":
        source = img + torch.randn(img.shape, generator=gen) * img.std()
    else:  # texture: diagonal stripes in a random colour
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        freq = 0.3 + torch.rand(1, generator=gen).item()
        source = torch.randn(c, 1, 1, generator=gen) * (1 + torch.sin((yy + xx) * freq))
    out = torch.where(region, source, img)
    return out, (out != img).any(0).float()


def smooth_noise(size: int, gen: torch.Generator, channels: int = 1, octaves: int = 2) -> torch.Tensor:
    """Band-limited noise [channels, S, S], about unit std: random grids of 4, 8, ... cells upsampled
    bicubically and summed (a cheap Perlin-like field)."""
    field = torch.zeros(channels, size, size)
    for o in range(octaves):
        cells = 4 * 2 ** o
        grid = torch.randn(1, channels, cells + 1, cells + 1, generator=gen)
        field += F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)[0] / 2 ** o
    return field / field.std().clamp_min(1e-6)


def perlin_mask(size: int, gen: torch.Generator, min_frac: float = 0.01, max_frac: float = 0.25) -> torch.Tensor:
    """Irregular blob region [S, S] bool: smooth noise above a threshold chosen so that the region
    covers between min_frac and max_frac of the image."""
    field = smooth_noise(size, gen)[0]
    frac = min_frac + (max_frac - min_frac) * torch.rand(1, generator=gen).item()
    return field > torch.quantile(field.flatten(), 1 - frac)


def latent_region(grid: tuple[int, int], gen: torch.Generator, shape: str = "box") -> torch.Tensor:
    """A random region of the patch grid, bool [h * w]: a blob of 3-15% of the patches ("irregular"; at least one)
    or a rectangle ("box")."""
    gh, gw = grid
    if shape == "irregular":
        field = smooth_noise(max(gh, gw), gen)[0][:gh, :gw]  # [h, w]
        k = max(1, int(round(gh * gw * (0.03 + 0.12 * torch.rand(1, generator=gen).item()))))
        m = torch.zeros(gh * gw, dtype=torch.bool)
        m[field.flatten().topk(k).indices] = True
        return m
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
