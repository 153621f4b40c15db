"""A validation signal for prompt learning that production has: normal images with pseudo-anomalies
pasted in, never test defects. Pure torch/numpy (the Ray Train worker calls it, knowing nothing of Ray).

The set, per product: up to `val_images` of its held-out train normals (the archive's normals beyond the
K shots); with none, views of the shots themselves (mirrored 96% crops: the bank then holds the same
pixels, so the bank map looks better than it is and the reported gain is a lower bound). Each image is
used twice: as it is (label 0) and with a pixel pseudo-anomaly of the kinds *held out of training*
(`val_kinds`, by default DRAEM-style blended blobs: a defect shape the decoder never trained on), all
drawn from a fixed seed, so every validation of a run scores the same set.

A validation builds each product's bank from its shots with the current model (the frozen CLIP's features by
default; with bank_source "prompted" they move with the visual prompts), computes the bank map alone, the decoder's
map alone and their fusion as the scorer deploys it (pipeline.model.scoring, each map's normal level taken from the
clean images, as threshold calibration does), and reports pixel AUROC of each on a stride-4 pixel grid, and image
AUROC of the fusion, each the mean over products. With image_score "auto" it also scores the images each way
(the map's max, and z_0's probability with the bank's or the fused map's max) and names the one to deploy. The
epoch-0 validation (before training) is the baseline the trained parts must beat.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.evaluation.metrics import auroc
from pipeline.fitting.bank import MemoryBank, pick_backend
from pipeline.fitting.shots import ProductShots, crops
from pipeline.model.anople import AnoPLe, Encoded
from pipeline.model.config import FUSION_WEIGHTS, IMAGE_SCORES
from pipeline.model.pseudo import pixel_anomaly
from pipeline.model.scoring import GLOBAL, component_maps, encode, fuse, text_features
from pipeline.sources.images import decode_image, to_model_input

VAL_SEED = 7919  # the validation set's own stream, apart from training's
STRIDE = 4       # pixels per side between the pixels scored: 1/16 of them, plenty for an AUROC
IMAGE_SCORE_MARGIN = 0.02  # image AUROC a z_0 image score must add over the map's max to be chosen (2 points)


@dataclass
class ValidationSet:
    pixels: torch.Tensor             # [V, 3, S, S] normalised views: clean and pseudo-anomalous
    masks: torch.Tensor              # [V, S, S] bool, True on pseudo-anomalous pixels
    products: list[str]              # [V] each view's product
    shots: dict[str, torch.Tensor]   # product -> [K, 3, S, S] the shots its bank is built from
    source: dict[str, str]           # product -> "heldout_normals" | "shot_views"

    @property
    def labels(self) -> np.ndarray:  # [V] 1 where the view holds a pseudo-anomaly
        return self.masks.flatten(1).any(1).numpy().astype(np.int8)


def build_validation(data: dict[str, ProductShots], products: list[str], size: int, kinds: tuple[str, ...],
                     per_product: int, seed: int) -> ValidationSet:
    """The validation views of `products` from their normals (never a test image)."""
    gen = torch.Generator().manual_seed(VAL_SEED + seed)
    xs, ms, ps, shots, source = [], [], [], {}, {}
    for p in products:
        d = data[p]
        shot_rgb = [decode_image(d.images[i]) for i in d.shots]
        shots[p] = torch.stack([torch.from_numpy(to_model_input(r, size)) for r in shot_rgb])
        if d.heldout:
            normals, source[p] = [decode_image(d.images[i]) for i in d.heldout[:per_product]], "heldout_normals"
        else:
            normals = [np.ascontiguousarray(c[:, ::-1]) for r in shot_rgb for c in crops(r)][:per_product]
            source[p] = "shot_views"
        for rgb in normals:
            x = torch.from_numpy(to_model_input(rgb, size))  # [3, S, S]
            kind = kinds[int(torch.randint(0, len(kinds), (1,), generator=gen))]
            bad, mask = pixel_anomaly(x, kind, gen)
            xs += [x, bad]
            ms += [torch.zeros(size, size, dtype=torch.bool), mask > 0]
            ps += [p, p]
    return ValidationSet(torch.stack(xs), torch.stack(ms), ps, shots, source)


def _per_product(fn, products: list[str], *arrays) -> float:
    """The mean over products of fn(rows of that product): per product, as the paper's metrics are (a
    pooled AUROC would also rank one product's scores against another's)."""
    idx = {p: [i for i, q in enumerate(products) if q == p] for p in sorted(set(products))}
    return float(np.nanmean([fn(*(a[rows] for a in arrays)) for rows in idx.values()]))


def _pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Pixel AUROC of maps [V, S, S] against masks [V, S, S] on the stride grid."""
    return auroc(maps[:, ::STRIDE, ::STRIDE].ravel(), masks[:, ::STRIDE, ::STRIDE].ravel())


@torch.inference_mode()
def validate(model: AnoPLe, vs: ValidationSet, device: str, batch_size: int = 16) -> dict[str, float]:
    """{bank,text,fused}_pixel_auroc and fused_image_auroc of the model as it is now."""
    products = sorted(set(vs.products))
    backend = pick_backend(device)

    def encode_all(x: torch.Tensor) -> Encoded:
        return Encoded.cat([encode(model, x[i:i + batch_size].numpy(), device) for i in range(0, len(x), batch_size)])

    banks = {p: MemoryBank([f.reshape(-1, f.shape[-1]).cpu().numpy() for f in model.bank_features(encode_all(vs.shots[p]))],
                           backend) for p in products}
    kinds = ("bank", "text") if model.decoder is not None else ("bank",)
    maps = component_maps(model, encode_all(vs.pixels), vs.products, banks, text_features(model, products),
                          kinds + ((GLOBAL,) if model.decoder is not None else ()))
    labels, masks = vs.labels, vs.masks.numpy()
    # each map's normal level per product, from the clean views (as fitting.fit_product does)
    clean = {p: [i for i, q in enumerate(vs.products) if q == p and labels[i] == 0] for p in products}
    scales = {p: {k: max(float(maps[k][clean[p]].flatten(1).amax(1).mean()), 1e-8) for k in kinds}
              for p in products}
    def pixel(fused_maps: np.ndarray) -> float:
        return _per_product(_pixel_auroc, vs.products, fused_maps, masks)

    out = {}
    for k in kinds:  # each map alone, smoothed as the scorer smooths it
        alone = dataclasses.replace(model.cfg, fusion=k)
        out[f"{k}_pixel_auroc"] = pixel(fuse(alone, {k: maps[k]}, vs.products, scales)[1])
    cfg, weight = model.cfg, None
    if cfg.fusion == "weighted" and cfg.fusion_weight < 0 and "text" in maps:  # choose w on this signal
        tried = {w: pixel(fuse(cfg, maps, vs.products, scales, weight=w)[1]) for w in FUSION_WEIGHTS}
        weight = max(FUSION_WEIGHTS, key=lambda w: (tried[w], -w))  # ties go to the bank
        out["fusion_weight"] = weight
    score = None
    if cfg.image_score == "auto" and GLOBAL in maps:  # choose the image score on this signal (the paper is silent)
        tried = {m: _per_product(auroc, vs.products, fuse(cfg, maps, vs.products, scales, weight, score=m)[0], labels)
                 for m in IMAGE_SCORES}
        # the z_0 scores must beat the map's by more than this small set's noise to be deployed (ties: the map)
        best = max(IMAGE_SCORES, key=lambda m: (tried[m], m == "map"))
        score = best if tried[best] >= tried["map"] + IMAGE_SCORE_MARGIN else "map"
        out |= {f"image_auroc_{m}": v for m, v in tried.items()} | {"image_score": float(IMAGE_SCORES.index(score))}
    scores, fused = fuse(cfg, maps, vs.products, scales, weight=weight, score=score)
    out["fused_pixel_auroc"] = pixel(fused)
    out["fused_image_auroc"] = _per_product(auroc, vs.products, scores, labels)
    return out


def gain(val) -> dict[str, float]:
    """What training added on the validation signal (a prompt_training.ValRecord): the best epoch's fused
    map against the bank map alone before training, in AUROC points (x100)."""
    base = val.baseline.get("bank_pixel_auroc", float("nan"))
    out = {"val_gain_pixel_auroc": 100 * (val.best - base), "val_best_fused_pixel_auroc": val.best,
           "val_bank_pixel_auroc_untrained": base, "val_best_epoch": float(val.best_epoch)}
    if val.best_weight >= 0:
        out["val_fusion_weight"] = val.best_weight
    if val.best_image_score:
        out["val_image_score"] = val.best_image_score
    return out


KEYS = ("bank_pixel_auroc", "text_pixel_auroc", "fused_pixel_auroc", "fused_image_auroc", "fusion_weight",
        "image_score") + tuple(f"image_auroc_{m}" for m in IMAGE_SCORES)  # image_score: an index into IMAGE_SCORES


def on_rank0(compute, rank: int, world: int) -> dict[str, float]:
    """`compute()` on rank 0, its numbers sent to every rank of the torch.distributed group: data-parallel
    workers must all take the same best-epoch and early-stop decisions (and only one need validate)."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return compute()
    got = compute() if rank == 0 else {}
    t = torch.tensor([got.get(k, float("nan")) for k in KEYS], dtype=torch.float64)  # [len(KEYS)]
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return {k: float(v) for k, v in zip(KEYS, t.cpu()) if not np.isnan(float(v))}


NO_GAIN_POINTS = 0.5  # a gain under half an AUROC point is within the signal's noise: nothing learned


def verdict(v: dict) -> tuple[str, str | None]:
    """(one line on what training added, a warning when it added nothing) from validation.json's dict."""
    where = ", ".join(sorted(set(v.get("sources", {}).values()))) or "normals"
    line = (f"validation (pseudo-anomalies held out of training, on {where}): fused pixel AUROC "
            f"{100 * v['val_best_fused_pixel_auroc']:.1f} at epoch {int(v['val_best_epoch'])} vs the bank alone "
            f"before training {100 * v['val_bank_pixel_auroc_untrained']:.1f}: "
            f"{v['val_gain_pixel_auroc']:+.1f} points" + (" (stopped early)" if v.get("stopped_early") else ""))
    if not v["val_gain_pixel_auroc"] >= NO_GAIN_POINTS:
        return line, (f"the trained prompts and decoder add nothing over the memory bank on the validation signal "
                      f"({v['val_gain_pixel_auroc']:+.1f} points): this model scores like its bank alone")
    return line, None
