"""Scoring with a trained deployment: prompted backbone + memory banks + thresholds, loaded from its artifact.
No Ray here. The math on a batch (encode, the component maps, their fusion) is pipeline.model.scoring;
`Scorer` holds one model's banks, text features and thresholds, built once, complete.
"""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load as st_load

from pipeline import artifact
from pipeline.errors import NotFoundError
from pipeline.fitting.bank import MemoryBank, pick_backend
from pipeline.fitting.weights import build_model
from pipeline.model.anople import AnoPLe, Encoded
from pipeline.model.config import AnoPLeConfig
from pipeline.model.scoring import component_maps, encode, fuse, text_features


class UnknownProductError(NotFoundError):
    """Images of a product this scorer holds no bank for."""


def checked_bank(files: artifact.Files, spec: artifact.ModelSpec, product: str, model: AnoPLe, backend: str) -> MemoryBank:
    """A product's bank, refused unless it is what this model searches (artifact.check_bank: one [n_patches, d_v]
    array of finite features per bank layer)."""
    where = f"{files.uri}: {spec.products[product].bank_file}"
    if spec.feature_dim != model.d_v or len(spec.bank_layers) != len(model.bank_layers):
        raise artifact.ModelRefused(f"{files.uri}: model.json says {len(spec.bank_layers)} bank layers of width "
                                    f"{spec.feature_dim}; the model built from it has {len(model.bank_layers)} of "
                                    f"{model.d_v}")
    layers = artifact.bank_arrays(files.read(spec.products[product].bank_file), where)
    artifact.check_bank(spec, product, layers, where)
    return MemoryBank(layers, backend)


def load_model(files: artifact.Files, spec: artifact.ModelSpec, device: str) -> AnoPLe:
    """The artifact's AnoPLe: the backbone its spec names (fingerprint checked) with its trained prompts loaded
    (each file checked against the manifest). Refused (artifact.ModelRefused) when config or prompts are wrong."""
    try:
        cfg = AnoPLeConfig.from_artifact(spec.anople)
    except (TypeError, ValueError) as e:
        raise artifact.ModelRefused(f"{files.uri}: model.json's AnoPLe config is refused ({e})") from e
    model = build_model(spec.backbone, spec.weights, spec.seed, cfg, device, spec.weights_fingerprint)
    if spec.prompts_file:
        try:
            model.load_prompt_state(st_load(files.read(spec.prompts_file)))
        except (ValueError, RuntimeError) as e:  # safetensors' own errors are one of those
            raise artifact.ModelRefused(f"{files.uri}: {spec.prompts_file} is refused ({e})") from e
    elif cfg.trains:
        raise artifact.ModelRefused(f"{files.uri}: a trained model ({cfg.prompt_mode}) without prompts")
    return model


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
    def load(cls, artifact_uri: str, products: list[str] | None = None, device: str = "auto",
             expected_sha256: str | None = None) -> "Scorer":
        """The artifact's model with the banks of `products` (default: all). Every file read is checked against the
        artifact's manifest (and the manifest against `expected_sha256`, the registered version's record), the spec
        validated, the prompts and banks checked against the model's shapes: a tampered or broken model is
        refused (artifact.ModelRefused) before it scores a row."""
        device = pick_device(device)
        files = artifact.Files(artifact_uri, expected_sha256)
        spec = artifact.ModelSpec.from_json(files.read("model.json").decode()).validate()
        model = load_model(files, spec, device)
        wanted = sorted(spec.products) if products is None else list(products)
        unknown = [p for p in wanted if p not in spec.products]
        if unknown:
            raise UnknownProductError(f"model at {artifact_uri} has no product {', '.join(unknown)}")
        backend = pick_backend(device)
        banks = {p: checked_bank(files, spec, p, model, backend) for p in wanted}
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
