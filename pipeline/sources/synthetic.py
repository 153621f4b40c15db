"""Synthetic factory products with synthetic defects and exact masks, in the MVTec-AD folder layout.

Used by the demo and the tests (nothing is downloaded). Each product has a per-image random nuisance
(shift, noise, lighting) so normal images are not identical; each defect is drawn into a separate
mask at the same time, so the mask is exactly the set of changed pixels' region.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

PRODUCTS = ("tile", "washer", "fabric", "pill", "grid")
DEFECTS = ("scratch", "stain", "hole")


def product_names(n: int) -> tuple[str, ...]:
    """n distinct product names: the base patterns first, then variants ``tile-2``, ``washer-2``, ...
    (same pattern, other colours and scale), so a deployment can hold as many products as a real line."""
    return tuple(PRODUCTS[i % len(PRODUCTS)] + (f"-{i // len(PRODUCTS) + 1}" if i >= len(PRODUCTS) else "")
                 for i in range(n))


def _variant(product: str) -> tuple[str, np.ndarray, float]:
    """'tile' -> ('tile', no tint, scale 1); 'tile-3' -> ('tile', a fixed tint, a fixed pattern scale)."""
    base, _, k = product.partition("-")
    if base not in PRODUCTS:
        raise ValueError(f"unknown synthetic product {product!r}; choose from {PRODUCTS} or their variants")
    if not k:
        return base, np.ones(3, np.float32), 1.0
    if not k.isdigit() or int(k) < 2:
        raise ValueError(f"synthetic product variant {product!r}: use <pattern>-<n>, n >= 2")
    vr = np.random.default_rng([int(k), PRODUCTS.index(base)])
    return base, vr.uniform(0.6, 1.3, 3).astype(np.float32), float(vr.uniform(0.7, 1.4))


def normal_image(product: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A normal specimen, uint8 [size, size, 3]."""
    product, tint, f = _variant(product)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = rng.uniform(-2, 2, size=2)
    light = rng.uniform(0.9, 1.1)
    if product == "tile":  # checkerboard ceramic
        period = size * f / 8
        v = ((np.floor((xx + dx) / period) + np.floor((yy + dy) / period)) % 2) * 80 + 120
        img = np.stack([v, v * 0.9, v * 0.8], axis=-1)
    elif product == "washer":  # metal ring on a dark belt
        c = size / 2
        r = np.hypot(xx - c - dx, yy - c - dy)
        ring = (r > size * 0.18 * f) & (r < size * 0.38 * min(f, 1.3))
        img = np.where(ring[..., None], [170, 170, 180], [40, 45, 50]).astype(np.float32)
    elif product == "fabric":  # woven stripes
        v = 110 + 40 * np.sin((xx + dx) * 2 * np.pi / (size * f / 16)) * np.sin((yy + dy) * 2 * np.pi / (size * f / 16))
        img = np.stack([v * 0.6, v * 0.8, v], axis=-1)
    elif product == "pill":  # white capsule on grey
        c = size / 2
        inside = ((xx - c - dx) / (size * 0.35 * min(f, 1.3))) ** 2 + ((yy - c - dy) / (size * 0.18 * f)) ** 2 < 1
        img = np.where(inside[..., None], [235, 230, 220], [120, 120, 120]).astype(np.float32)
    else:  # "grid": wire mesh (_variant admits only the patterns above)
        period = size * f / 10
        line = (((xx + dx) % period) < 2) | (((yy + dy) % period) < 2)
        img = np.where(line[..., None], [200, 190, 160], [60, 60, 70]).astype(np.float32)
    img = img * tint * light + rng.normal(0, 4, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def add_defect(img: np.ndarray, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect; returns (image, bool mask of exactly the pixels drawn)."""
    size = img.shape[0]
    mask_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_img)
    cx, cy = rng.uniform(size * 0.25, size * 0.75, size=2)
    if defect == "scratch":
        ang = rng.uniform(0, np.pi)
        half = rng.uniform(size * 0.12, size * 0.25)
        x0, y0 = cx - half * np.cos(ang), cy - half * np.sin(ang)
        x1, y1 = cx + half * np.cos(ang), cy + half * np.sin(ang)
        draw.line([(x0, y0), (x1, y1)], fill=255, width=max(2, size // 40))
        colour = np.array([250, 250, 250])
    elif defect == "stain":
        rx, ry = rng.uniform(size * 0.05, size * 0.1, size=2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        colour = np.array([150, 60, 20])
    elif defect == "hole":
        r = rng.uniform(size * 0.04, size * 0.08)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        colour = np.array([0, 0, 0])
    else:
        raise ValueError(f"unknown synthetic defect {defect!r}; choose from {DEFECTS}")
    mask = np.asarray(mask_img) > 0
    out = img.copy()
    out[mask] = np.clip(colour + rng.normal(0, 3, size=(mask.sum(), 3)), 0, 255).astype(np.uint8)
    return out, mask


def make_mvtec_folder(root: str, products: tuple[str, ...] = PRODUCTS[:3], n_train: int = 6,
                      n_test_good: int = 4, n_test_defect: int = 2, size: int = 128, seed: int = 0) -> str:
    """Write ``<root>/<product>/{train/good, test/<defect>, ground_truth/<defect>}`` PNGs; returns root.

    n_test_defect images per defect type. Deterministic for a seed.
    """
    for p_i, product in enumerate(products):
        rng = np.random.default_rng([seed, p_i])
        folders = {"train/good": n_train, "test/good": n_test_good}
        folders.update({f"test/{d}": n_test_defect for d in DEFECTS})
        for folder, n in folders.items():
            os.makedirs(os.path.join(root, product, folder), exist_ok=True)
            defect = folder.split("/")[1]
            if defect != "good":
                os.makedirs(os.path.join(root, product, "ground_truth", defect), exist_ok=True)
            for i in range(n):
                img = normal_image(product, size, rng)
                name = f"{i:03d}.png"
                if defect != "good":
                    img, mask = add_defect(img, defect, rng)
                    Image.fromarray(mask.astype(np.uint8) * 255).save(
                        os.path.join(root, product, "ground_truth", defect, f"{i:03d}_mask.png"))
                Image.fromarray(img).save(os.path.join(root, product, folder, name))
    return root
