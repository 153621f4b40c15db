"""Scoring with a trained deployment artifact: prompted backbone + memory banks + thresholds.

One visual forward per image (global view, prefix c_0 only); text features are computed once per
product at load time and cached. The anomaly map is the harmonic mean of the decoder's text map and the
memory-bank map (optionally each first scaled by its level on the product's normal images; or either map
alone, per the config's fusion), upsampled and Gaussian-smoothed; the image score is its maximum. Used by
the Ray Data actors and by training's threshold calibration. No Ray here.
"""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load as st_load

from pipeline import artifact, storage
from pipeline.bank import MemoryBank, pick_backend
from pipeline.model.anople import AnoPLe, build_tokenizer, pixel_map
from pipeline.model.anomaly_map import blur, harmonic_fusion, image_score, patch_scores_to_map
from pipeline.model.backbone import fingerprint
from pipeline.model.config import AnoPLeConfig
from pipeline.weights import load_clip


class UnknownProductError(KeyError):
    pass


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_model(backbone: str, weights: str, seed: int, cfg: AnoPLeConfig, device: str,
                expect_fingerprint: str | None = None) -> AnoPLe:
    """The frozen backbone wrapped in AnoPLe; with `expect_fingerprint`, proven to be the very weights
    the model was trained with."""
    clip = load_clip(backbone, weights, seed=seed)
    if expect_fingerprint is not None:
        got = fingerprint(clip)
        if got != expect_fingerprint:
            raise RuntimeError(
                f"backbone {backbone} with weights {weights!r} has fingerprint {got}, but the model was "
                f"trained on {expect_fingerprint}: the weights changed since training")
    return AnoPLe(clip, cfg, build_tokenizer(backbone)).to(device).eval()


def select(enc: dict, rows) -> dict:
    """Rows of an encode() result."""
    return {"z0": enc["z0"][rows], "patches": {k: v[rows] for k, v in enc["patches"].items()}}


class Scorer:
    """Image batch -> (image scores, anomaly maps) for the products whose banks it holds."""

    def __init__(self, model: AnoPLe, banks: dict[str, MemoryBank], device: str,
                 spec: artifact.ModelSpec | None = None):
        self.model, self.banks, self.device, self.spec = model, banks, device, spec
        self.text: dict[str, torch.Tensor] = {}  # product -> [2, D] cached text features
        # product -> {"text": level, "bank": level} of each map on normal images (calibrated fusion)
        self.scales: dict[str, dict[str, float]] = (
            {p: dict(ps.map_scales) for p, ps in spec.products.items()} if spec else {})
        if model.decoder is not None:
            self.cache_text(list(banks))

    @torch.inference_mode()
    def cache_text(self, products: list[str]) -> None:
        todo = [p for p in products if p not in self.text]
        if todo and self.model.decoder is not None:
            feats = self.model.encode_text(todo)  # [P, 2, D]
            self.text.update({p: feats[i] for i, p in enumerate(todo)})

    @classmethod
    def load(cls, artifact_uri: str, products: list[str] | None = None, device: str = "auto") -> "Scorer":
        device = pick_device(device)
        spec = artifact.load_spec(artifact_uri)
        cfg = AnoPLeConfig.from_dict(spec.anople)
        model = build_model(spec.backbone, spec.weights, spec.seed, cfg, device, spec.weights_fingerprint)
        if spec.prompts_file:
            model.load_prompt_state(st_load(storage.read_bytes(storage.join(artifact_uri, spec.prompts_file))))
        wanted = sorted(spec.products) if products is None else products
        backend = pick_backend(device)
        banks = {}
        for p in wanted:
            if p not in spec.products:
                raise UnknownProductError(p)
            data = storage.read_bytes(storage.join(artifact_uri, spec.products[p].bank_file))
            banks[p] = MemoryBank.from_bytes(data, backend)
        return cls(model, banks, device, spec)

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray) -> dict:
        """[B, 3, S, S] normalised pixels -> the one visual forward (global view, prefix c_0)."""
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
            enc = self.model.encode_image(x)  # bf16 backbone on GPU (mixed precision)
        # heads, bank search and maps run in float32 (they are small; the bank distances need the bits)
        return {"z0": enc["z0"].float(), "patches": {k: v.float() for k, v in enc["patches"].items()}}

    @torch.inference_mode()
    def score(self, pixels: np.ndarray, products: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> scores [B] and maps [B, S, S] (float32). Every product must have a bank here."""
        missing = sorted({p for p in products if p not in self.banks})
        if missing:
            raise UnknownProductError(", ".join(missing))
        return self.score_encoded(self.encode(pixels), products)

    @torch.inference_mode()
    def score_encoded(self, enc: dict, products: list[str], banks: dict[str, MemoryBank] | None = None):
        """One encode() result -> scores [B] and fused, smoothed maps [B, S, S] (numpy float32)."""
        return self.fuse(self.component_maps(enc, products, banks), products)

    @torch.inference_mode()
    def component_maps(self, enc: dict, products: list[str], banks: dict[str, MemoryBank] | None = None) -> dict:
        """The evidence before fusion, at model resolution: {"bank": [B, S, S], "text": [B, S, S]}
        (whichever the config's fusion uses). Bank map: mean halved cosine distance to the nearest bank
        patch; text map: the decoder's anomaly probability."""
        banks = self.banks if banks is None else banks
        model, cfg = self.model, self.model.cfg
        S = model.image_size
        B = enc["z0"].shape[0]
        maps = {}
        if cfg.fusion in ("bank", "harmonic"):
            feats = model.bank_features(enc)  # per layer [B, HW, C]
            hw = feats[0].shape[1]
            patch = torch.empty(B, hw, device=feats[0].device)  # visual anomaly per patch
            for p in sorted(set(products)):
                rows = [i for i, q in enumerate(products) if q == p]
                queries = [f[rows].reshape(-1, f.shape[-1]) for f in feats]
                patch[rows] = banks[p].distance(queries).reshape(len(rows), hw).to(patch.device)
            maps["bank"] = patch_scores_to_map(patch, model.grid, S, sigma=0)  # [B, S, S]
        if cfg.fusion in ("text", "harmonic"):
            self.cache_text(sorted(set(products)))
            text = torch.stack([self.text[p] for p in products])  # [B, 2, D]
            head = model.text_head(enc, text.to(enc["z0"].dtype))
            maps["text"] = pixel_map(head["logits"].float(), S)  # [B, S, S]
        return maps

    def fuse(self, maps: dict, products: list[str]):
        """Component maps -> (scores [B], maps [B, S, S]) as numpy float32.

        Harmonic mean HM(t, b) = 2tb / (t + b) (Sec. 3.5). HM follows the smaller input (HM ~ 2t when
        t << b), so with `fusion_calibrated` each map is first divided by its own level on the product's
        normal calibration images (ProductSpec.map_scales): both then read "1 = as high as on normal
        images", and neither map silences the other merely by living on a smaller scale."""
        cfg = self.model.cfg
        if len(maps) == 1:
            amap = next(iter(maps.values()))
        else:
            t, b = maps["text"], maps["bank"]
            if cfg.fusion_calibrated:
                st = torch.tensor([self.scales.get(p, {}).get("text", 1.0) for p in products], device=t.device)
                sb = torch.tensor([self.scales.get(p, {}).get("bank", 1.0) for p in products], device=b.device)
                t, b = t / st.view(-1, 1, 1), b / sb.view(-1, 1, 1)
            amap = harmonic_fusion(t, b)
        amap = blur(amap.float(), cfg.blur_sigma)
        return image_score(amap).cpu().numpy(), amap.cpu().numpy()
