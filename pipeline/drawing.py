"""Heatmaps drawn for people: the fixed colour ramp, a region's contour, and the image beside its heatmap
overlay with the threshold's contour. Shared by the night's report and the evaluation's example overlays
(numpy and PIL only)."""
from __future__ import annotations

import numpy as np
from PIL import Image

# colour map anchors (black -> purple -> red -> orange -> pale yellow; an inferno-like ramp), linearly interpolated
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colormap(v: np.ndarray) -> np.ndarray:
    """float in [0, 1] [H, W] -> uint8 RGB [H, W, 3]."""
    x = np.clip(v, 0, 1) * (len(_ANCHORS) - 1)
    i = np.minimum(x.astype(int), len(_ANCHORS) - 2)
    t = (x - i)[..., None]
    return ((1 - t) * _ANCHORS[i] + t * _ANCHORS[i + 1]).astype(np.uint8)


def contour(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a bool [H, W] region (inside, with a neighbour outside)."""
    return mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))


def overlay(rgb: np.ndarray | None, amap: np.ndarray, scale: float, threshold: float) -> Image.Image:
    """Image | image with the heatmap in colour (fixed scale) and the threshold's contour, side by side.
    rgb uint8 [H, W, 3] or None (image unavailable: the heatmap alone); amap float [H, W] at the same size."""
    heat = colormap(amap / scale)  # [H, W, 3]
    base = rgb if rgb is not None else np.zeros_like(heat)
    blend = (0.45 * base + 0.55 * heat).astype(np.uint8)
    blend[contour(amap >= threshold)] = (0, 255, 255)  # cyan contour where the map crosses the threshold
    left = Image.fromarray(base if rgb is not None else heat)
    pair = Image.new("RGB", (2 * left.width + 4, left.height), (255, 255, 255))
    pair.paste(left, (0, 0))
    pair.paste(Image.fromarray(blend), (left.width + 4, 0))
    return pair
