"""Scoring with a trained deployment artifact: backbone + memory banks + thresholds.

Used by the Ray Data inference actors (one Scorer per actor, loaded in ``__init__``) and by training
for threshold calibration. No Ray in here.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline import artifact, storage
from pipeline.bank import MemoryBank, pick_backend
from pipeline.model.anomaly_map import image_score, patch_scores_to_map
from pipeline.model.backbone import PatchFeatureExtractor, fingerprint
from pipeline.weights import load_clip


class UnknownProductError(KeyError):
    pass


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_extractor(spec: artifact.ModelSpec, device: str) -> PatchFeatureExtractor:
    """The frozen backbone of an artifact, verified to be the very weights it was trained with."""
    clip = load_clip(spec.backbone, spec.weights, seed=spec.seed)
    got = fingerprint(clip)
    if got != spec.weights_fingerprint:
        raise RuntimeError(
            f"backbone {spec.backbone} with weights {spec.weights!r} has fingerprint {got}, but the model "
            f"was trained on {spec.weights_fingerprint}: the weights changed since training")
    return PatchFeatureExtractor(clip, tuple(spec.bank_layers)).to(device)


class Scorer:
    """Image batch -> (image scores, anomaly maps) for the products whose banks it holds."""

    def __init__(self, extractor: PatchFeatureExtractor, banks: dict[str, MemoryBank],
                 blur_sigma: float, device: str, spec: artifact.ModelSpec | None = None):
        self.extractor, self.banks, self.blur_sigma, self.device = extractor, banks, blur_sigma, device
        self.spec = spec

    @classmethod
    def load(cls, artifact_uri: str, products: list[str] | None = None, device: str = "auto") -> "Scorer":
        device = pick_device(device)
        spec = artifact.load_spec(artifact_uri)
        wanted = sorted(spec.products) if products is None else products
        backend = pick_backend(device)
        banks = {}
        for p in wanted:
            if p not in spec.products:
                raise UnknownProductError(p)
            data = storage.read_bytes(storage.join(artifact_uri, spec.products[p].bank_file))
            banks[p] = MemoryBank.from_bytes(data, backend)
        return cls(load_extractor(spec, device), banks, spec.blur_sigma, device, spec)

    @torch.inference_mode()
    def features(self, pixels: np.ndarray) -> list[torch.Tensor]:
        """[B, 3, S, S] normalised pixels -> per bank layer [B, h*w, C]."""
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
        return self.extractor(x)

    @torch.inference_mode()
    def score(self, pixels: np.ndarray, products: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> scores [B] and maps [B, S, S] (float32). Every product must have a bank here."""
        missing = sorted({p for p in products if p not in self.banks})
        if missing:
            raise UnknownProductError(", ".join(missing))
        feats = self.features(pixels)
        return self.score_features(feats, products)

    def score_features(self, feats: list[torch.Tensor], products: list[str]) -> tuple[np.ndarray, np.ndarray]:
        b, hw = feats[0].shape[:2]
        patch = torch.empty(b, hw, device=feats[0].device)  # [B, h*w] visual anomaly per patch
        for p in sorted(set(products)):
            rows = [i for i, q in enumerate(products) if q == p]
            queries = [f[rows].reshape(-1, f.shape[-1]) for f in feats]  # per layer [len(rows)*h*w, C]
            patch[rows] = self.banks[p].distance(queries).reshape(len(rows), hw).to(patch.device)
        grid = (self.extractor.grid.height, self.extractor.grid.width)
        amap = patch_scores_to_map(patch, grid, self.extractor.image_size, self.blur_sigma)  # [B, S, S]
        return image_score(amap).cpu().numpy(), amap.cpu().numpy()
