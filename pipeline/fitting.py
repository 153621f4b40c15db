"""Fitting one product from its few normal shots: shot selection, memory bank, threshold calibration.

Pure torch/numpy (runs inside a Ray Train worker, but knows nothing of Ray). Thresholds come from
normal images only, never from test data:
- ``heldout_normals``: train-split normals beyond the K shots, scored against the bank;
- ``shots_leave_one_out`` (no extra normals, K >= 2): each shot scored against a bank of the others;
- ``shots_augmented`` (K == 1): mild crops of the one shot scored against its own bank.
threshold = max(max(s), mean(s) + 3 std(s)) over those normal scores s. The same images give each
component map's level (mean per-image maximum) for the calibrated fusion, set before the scores s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.bank import MemoryBank
from pipeline.images import decode_image, to_model_input
from pipeline.scorer import select as select_rows

MAX_CALIBRATION = 64  # held-out normals scored per product; more adds time, not much precision


@dataclass
class ProductFit:
    product: str
    bank: MemoryBank
    threshold: float
    calibration: str
    calibration_scores: list[float]
    shots: list[str]
    map_scales: dict[str, float]  # each component map's level on the calibration normals


def choose_shots(image_ids: list[str], k: int, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic K shots (and the rest, for calibration) from a product's train normals."""
    ids = sorted(image_ids)
    if len(ids) < k:
        raise ValueError(f"only {len(ids)} normal train images, --shots {k} needs {k}")
    order = np.random.default_rng(seed).permutation(len(ids))
    chosen = [ids[i] for i in order]
    return chosen[:k], chosen[k:k + MAX_CALIBRATION]


def threshold_from(scores: list[float]) -> float:
    s = np.asarray(scores, dtype=np.float64)
    return float(max(s.max(), s.mean() + 3.0 * s.std()))


def _crops(rgb: np.ndarray) -> list[np.ndarray]:
    """Four 92%-area corner crops: a normal image seen slightly differently (K == 1 calibration)."""
    h, w = rgb.shape[:2]
    ch, cw = int(round(h * 0.96)), int(round(w * 0.96))
    return [rgb[:ch, :cw], rgb[:ch, w - cw:], rgb[h - ch:, :cw], rgb[h - ch:, w - cw:]]


def fit_product(product: str, images: dict[str, bytes], shots: list[str], heldout: list[str], scorer,
                backend: str = "faiss-cpu", batch_size: int = 16) -> ProductFit:
    """Build the bank from `shots` with the (trained) prompted encoder and calibrate its threshold on
    the fused scores the scorer will compute. `scorer` is a pipeline.scorer.Scorer."""
    size = scorer.model.image_size

    def encode(rgbs):
        encs = [scorer.encode(np.stack([to_model_input(r, size) for r in rgbs[i:i + batch_size]]))
                for i in range(0, len(rgbs), batch_size)]
        return {"z0": torch.cat([e["z0"] for e in encs]),
                "patches": {k: torch.cat([e["patches"][k] for e in encs]) for k in encs[0]["patches"]}}

    def bank_of(enc, rows):
        feats = scorer.model.bank_features(enc)  # per layer [N, HW, C]
        return MemoryBank([f[rows].reshape(-1, f.shape[-1]).cpu().numpy() for f in feats], backend)

    def maps(bank, enc):  # component maps of calibration images, scored against `bank`
        n = enc["z0"].shape[0]
        return scorer.component_maps(enc, [product] * n, banks={product: bank})

    shot_rgb = [decode_image(images[i]) for i in shots]
    enc = encode(shot_rgb)
    bank = bank_of(enc, list(range(len(shots))))
    if heldout:
        parts = [maps(bank, encode([decode_image(images[i]) for i in heldout]))]
        how = "heldout_normals"
    elif len(shots) >= 2:
        parts = []
        for j in range(len(shots)):
            rest = [i for i in range(len(shots)) if i != j]
            parts.append(maps(bank_of(enc, rest), select_rows(enc, [j])))
        how = "shots_leave_one_out"
    else:
        parts = [maps(bank, encode(_crops(shot_rgb[0])))]
        how = "shots_augmented"
    comp = {k: torch.cat([m[k] for m in parts]) for k in parts[0]}  # each [N, S, S]
    n = next(iter(comp.values())).shape[0]
    # each map's level on normal images: the mean of its per-image maxima (calibrated fusion)
    scales = {k: max(float(v.flatten(1).amax(1).mean()), 1e-8) for k, v in comp.items()}
    scorer.scales[product] = scales
    cal = [float(x) for x in scorer.fuse(comp, [product] * n)[0]]
    return ProductFit(product, bank, threshold_from(cal), how, cal, list(shots), scales)
