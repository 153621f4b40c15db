"""Fitting a deployment's products from their few normal shots: shot selection, memory banks, thresholds.

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
from typing import NamedTuple

import numpy as np
import torch

from pipeline import artifact
from pipeline.errors import UsageError
from pipeline.fitting.bank import MemoryBank, pick_backend
from pipeline.fitting.prompts import ShotBatch, shots_batch
from pipeline.model.anople import AnoPLe, Encoded
from pipeline.model.scoring import GLOBAL, component_maps, encode, fuse, text_features
from pipeline.sources import archive
from pipeline.sources.images import ImageDecodeError, decode_image, to_model_input

MAX_CALIBRATION = 64  # held-out normals scored per product; more adds time, not much precision


class ProductShots(NamedTuple):
    """A product's reference images: encoded bytes by image_id, the K shots, the held-out normals, and the
    normals left out because they do not decode ("<image_id>: <reason>")."""
    images: dict[str, bytes]
    shots: list[str]
    heldout: list[str]
    skipped: tuple[str, ...] = ()


@dataclass
class ProductFit:
    """What fitting one product produced: its bank and its calibrated threshold."""
    product: str
    bank: MemoryBank
    threshold: float
    calibration: str                 # "heldout_normals" | "shots_leave_one_out" | "shots_augmented"
    calibration_scores: list[float]  # the normal images' fused scores behind the threshold
    shots: list[str]
    map_scales: dict[str, float]     # each component map's level on the calibration normals
    class_name: str = ""             # the words its prompts used
    skipped: tuple[str, ...] = ()    # normals left out because they do not decode

    def spec(self) -> artifact.ProductSpec:
        return artifact.ProductSpec(threshold=self.threshold, calibration=self.calibration,
                                    n_calibration=len(self.calibration_scores), shots=self.shots,
                                    n_patches=self.bank.n_patches, bank_file=artifact.bank_file(self.product),
                                    map_scales=self.map_scales, class_name=self.class_name)


def choose_shots(image_ids: list[str], k: int, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic K shots (and the rest, for calibration) from a product's train normals."""
    ids = sorted(image_ids)
    if len(ids) < k:
        raise UsageError(f"only {len(ids)} normal train images, --shots {k} needs {k}")
    order = np.random.default_rng(seed).permutation(len(ids))
    chosen = [ids[i] for i in order]
    return chosen[:k], chosen[k:k + MAX_CALIBRATION]


def load_shots(archive_uri: str, deployment: str, products: list[str], k: int, seed: int) -> dict[str, ProductShots]:
    """Each product's train-split normals from the archive, split into K shots and held-out normals."""
    table = archive.read_table(archive_uri, deployment, rows=archive.Rows(split="train", products=tuple(products)),
                               columns=["image_id", "product", "image", "label"])
    rows: dict[str, list] = {p: [] for p in products}
    for r in table.to_pylist():
        rows[r["product"]].append(r)
    data = {}
    for product, rs in rows.items():
        images = {r["image_id"]: r["image"] for r in rs}
        normal = [r["image_id"] for r in rs if r["label"] in (0, None)]
        order, _ = choose_shots(normal, len(normal), seed)  # the seed's order; undecodable images drop out
        usable, skipped = [], []
        for i in order:
            try:
                decode_image(images[i])
                usable.append(i)
            except ImageDecodeError as e:
                skipped.append(f"{i}: {e}")
            if len(usable) == k + MAX_CALIBRATION:
                break
        if len(usable) < k:
            raise UsageError(f"product {product!r}: only {len(usable)} decodable normal train images "
                             f"({len(skipped)} do not decode), --shots {k} needs {k}")
        data[product] = ProductShots(images, usable[:k], usable[k:], tuple(skipped))
    return data


def shot_batch(data: dict[str, ProductShots], products: list[str], size: int, detail: bool = False) -> ShotBatch:
    """The shots of `products` as model input, for prompt learning; with `detail`, also decoded at 2x the size
    (the quadrant views' source: pipeline.fitting.prompts.make_views)."""
    rgb = {p: [decode_image(data[p].images[i]) for i in data[p].shots] for p in products}
    return shots_batch({p: [to_model_input(r, size) for r in rgb[p]] for p in products}, products,
                       {p: [to_model_input(r, 2 * size) for r in rgb[p]] for p in products} if detail else None)


def wants_detail(model: AnoPLe) -> bool:
    """Whether training cuts its quadrant views from the shots at 2x the model's size."""
    return model.cfg.multiscale and model.cfg.crop_source == "detail"


def threshold_from(scores: list[float]) -> float:
    s = np.asarray(scores, dtype=np.float64)
    return float(max(s.max(), s.mean() + 3.0 * s.std()))


def crops(rgb: np.ndarray) -> list[np.ndarray]:
    """Four 92%-area corner crops: a normal image seen slightly differently (K == 1 calibration)."""
    h, w = rgb.shape[:2]
    ch, cw = int(round(h * 0.96)), int(round(w * 0.96))
    return [rgb[:ch, :cw], rgb[:ch, w - cw:], rgb[h - ch:, :cw], rgb[h - ch:, w - cw:]]


def fit_product(model: AnoPLe, product: str, data: ProductShots, device: str, backend: str = "faiss-cpu",
                batch_size: int = 16) -> ProductFit:
    """Build the bank from the shots with the (trained) prompted encoder and calibrate the threshold on
    the fused scores the scorer will compute."""
    text = text_features(model, [product])

    def encode_all(rgbs: list[np.ndarray]) -> Encoded:
        return Encoded.cat([encode(model, np.stack([to_model_input(r, model.image_size) for r in rgbs[i:i + batch_size]]),
                                   device) for i in range(0, len(rgbs), batch_size)])

    def bank_of(enc: Encoded) -> MemoryBank:
        return MemoryBank([f.reshape(-1, f.shape[-1]).cpu().numpy() for f in model.bank_features(enc)], backend)

    def maps(bank: MemoryBank, enc: Encoded) -> dict:  # component maps of calibration images against `bank`
        return component_maps(model, enc, [product] * len(enc), {product: bank}, text)

    shot_rgb = [decode_image(data.images[i]) for i in data.shots]
    enc = encode_all(shot_rgb)
    bank = bank_of(enc)
    if data.heldout:
        parts = [maps(bank, encode_all([decode_image(data.images[i]) for i in data.heldout]))]
        how = "heldout_normals"
    elif len(data.shots) >= 2:
        parts = [maps(bank_of(enc.rows([i for i in range(len(enc)) if i != j])), enc.rows([j]))
                 for j in range(len(enc))]
        how = "shots_leave_one_out"
    else:
        parts = [maps(bank, encode_all(crops(shot_rgb[0])))]
        how = "shots_augmented"
    comp = {k: torch.cat([m[k] for m in parts]) for k in parts[0]}  # each [N, S, S] (GLOBAL: [N])
    n = next(iter(comp.values())).shape[0]
    # each map's level on normal images: the mean of its per-image maxima (calibrated fusion)
    scales = {k: max(float(v.flatten(1).amax(1).mean()), 1e-8) for k, v in comp.items() if k != GLOBAL}
    cal = [float(x) for x in fuse(model.cfg, comp, [product] * n, {product: scales})[0]]
    return ProductFit(product, bank, threshold_from(cal), how, cal, list(data.shots), scales,
                      model.cfg.class_text(product), data.skipped)


def fit_products(model: AnoPLe, data: dict[str, ProductShots], products: list[str], device: str) -> dict[str, ProductFit]:
    """Banks and thresholds of `products` with the model as it is (trained or not)."""
    fits = {}
    for p in products:
        try:
            fits[p] = fit_product(model, p, data[p], device, pick_backend(device))
        except Exception as e:
            e.add_note(f"while fitting product {p!r}")
            raise
    return fits
