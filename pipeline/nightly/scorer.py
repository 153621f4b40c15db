"""Scoring with a trained deployment: prompted backbone + memory banks + thresholds, loaded from its artifact.
No Ray here. The math on a batch (encode, the component maps, their fusion) is pipeline.model.scoring;
`Scorer` holds one model's banks, text features and thresholds, built once, complete.
"""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load as st_load

from pipeline import artifact, storage
from pipeline.errors import NotFoundError
from pipeline.fitting.bank import MemoryBank, pick_backend
from pipeline.fitting.weights import build_model
from pipeline.model.anople import AnoPLe, Encoded
from pipeline.model.config import AnoPLeConfig
from pipeline.model.scoring import component_maps, encode, fuse, text_features


class UnknownProductError(NotFoundError):
    """Images of a product this scorer holds no bank for."""


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Scorer:
    """Image batch -> (image scores, anomaly maps) for the products whose banks it holds."""

    def __init__(self, model: AnoPLe, banks: dict[str, MemoryBank], device: str,
                 thresholds: dict[str, float] | None = None, scales: dict[str, dict[str, float]] | None = None):
        self.model, self.banks, self.device = model, dict(banks), device
        self.thresholds = dict(thresholds or {})  # product -> image-score threshold
        self.scales = dict(scales or {})  # product -> {"text", "bank"} map levels on normals (calibrated fusion)
        self.text = text_features(model, sorted(self.banks))  # product -> [2, D], computed once

    @classmethod
    def from_fits(cls, model: AnoPLe, fits: dict, device: str) -> "Scorer":
        """From fitting.ProductFit values, in process (no artifact)."""
        return cls(model, {p: f.bank for p, f in fits.items()}, device,
                   thresholds={p: f.threshold for p, f in fits.items()},
                   scales={p: f.map_scales for p, f in fits.items()})

    @classmethod
    def load(cls, artifact_uri: str, products: list[str] | None = None, device: str = "auto") -> "Scorer":
        """The artifact's model with the banks of `products` (default: all)."""
        device = pick_device(device)
        spec = artifact.load_spec(artifact_uri)
        model = build_model(spec.backbone, spec.weights, spec.seed, AnoPLeConfig.from_artifact(spec.anople), device,
                            spec.weights_fingerprint)
        if spec.prompts_file:
            model.load_prompt_state(st_load(storage.read_bytes(storage.join(artifact_uri, spec.prompts_file))))
        wanted = sorted(spec.products) if products is None else list(products)
        unknown = [p for p in wanted if p not in spec.products]
        if unknown:
            raise UnknownProductError(f"model at {artifact_uri} has no product {', '.join(unknown)}")
        backend = pick_backend(device)
        banks = {p: MemoryBank.from_bytes(storage.read_bytes(storage.join(artifact_uri, spec.products[p].bank_file)),
                                          backend) for p in wanted}
        return cls(model, banks, device, thresholds={p: spec.products[p].threshold for p in wanted},
                   scales={p: dict(spec.products[p].map_scales) for p in wanted})

    def encode(self, pixels: np.ndarray) -> Encoded:
        return encode(self.model, pixels, self.device)

    @torch.inference_mode()
    def score(self, pixels: np.ndarray | torch.Tensor, products: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> scores [B] and maps [B, S, S] (float32). Every product must have a bank here."""
        missing = sorted({p for p in products if p not in self.banks})
        if missing:
            raise UnknownProductError(f"no bank for product {', '.join(missing)}")
        maps = component_maps(self.model, self.encode(pixels), products, self.banks, self.text)
        return fuse(self.model.cfg, maps, products, self.scales)
