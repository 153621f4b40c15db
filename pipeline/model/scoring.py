"""The paper's scoring math on one batch (Sec. 3.5), pure torch: shared by the scorer (pipeline.nightly.scorer),
threshold calibration (pipeline.fitting.shots), validation and the benchmarks.

One visual forward per image (global view, prefix c_0 only). Then:
- `component_maps`: the decoder's text map and the memory-bank map, at model resolution;
- `fuse`: their harmonic mean (optionally each first scaled by its level on the product's normal images, or
  either map alone, per the config's fusion), Gaussian-smoothed; the image score is the map's maximum, or (config
  image_score) its harmonic mean with the global branch's abnormal probability, softmax(<z_0, t> / T)[abnormal]
  (PromptAD's image score takes the bank map's maximum there).
A product's memory bank is seen through `PatchBank` (pipeline.fitting.bank.MemoryBank is one), so this package never
imports faiss.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .anomaly_map import blur, harmonic_fusion, image_score, patch_scores_to_map, pixel_map
from .anople import AnoPLe, Encoded
from .config import CLIP_MEAN, CLIP_STD, AnoPLeConfig

GLOBAL = "global"  # component_maps' key of the global branch's abnormal probability [B] (not a map)


class PatchBank(Protocol):
    """A product's memory bank of normal patch features, per bank layer."""

    def distance(self, queries: list[torch.Tensor]) -> torch.Tensor:
        """per layer [Q, C] L2-normed queries -> [Q]: the mean over layers of the halved cosine distance to the
        nearest bank patch (PromptAD's visual anomaly)."""
        ...


def _normalizer(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std as [1, 3, 1, 1] tensors on `device` (images.normalize, in torch)."""
    return (torch.tensor(CLIP_MEAN).view(1, 3, 1, 1).to(device),
            torch.tensor(CLIP_STD).view(1, 3, 1, 1).to(device))


@torch.inference_mode()
def model_input(pixels: np.ndarray | torch.Tensor, device: str) -> torch.Tensor:
    """[B, 3, S, S] pixels -> float32 model input on `device`. uint8 pixels (images.to_model_pixels, what decode
    tasks send, or a tensor the actor decoded on its device: device_decode) are moved as bytes and normalised
    there, as images.normalize does; float32 ones are taken as already normalised (images.to_model_input)."""
    if not isinstance(pixels, torch.Tensor):
        pixels = torch.from_numpy(np.ascontiguousarray(pixels, dtype=None if pixels.dtype == np.uint8 else np.float32))
    if pixels.dtype == torch.uint8:
        x = pixels.to(device, non_blocking=True).float() / 255.0
        mean, std = _normalizer(device)
        return (x - mean) / std  # [B, 3, S, S]
    return pixels.to(device, torch.float32)


@torch.inference_mode()
def encode(model: AnoPLe, pixels: np.ndarray, device: str) -> Encoded:
    """[B, 3, S, S] pixels (uint8, or normalised float32) -> the one visual forward (global view, prefix c_0),
    in float32."""
    x = model_input(pixels, device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        enc = model.encode_image(x)  # bf16 backbone on GPU (mixed precision)
    # heads, bank search and maps run in float32 (they are small; the bank distances need the bits)
    return enc.float()


@torch.inference_mode()
def text_features(model: AnoPLe, products: list[str]) -> dict[str, torch.Tensor]:
    """product -> its [2, D] normal/abnormal text features; {} for a model without a decoder."""
    if model.decoder is None or not products:
        return {}
    feats = model.encode_text(list(products))  # [P, 2, D]
    return {p: feats[i] for i, p in enumerate(products)}


def image_score_mode(cfg: AnoPLeConfig, override: str | None = None) -> str:
    """The image score a config deploys: "auto" that no validation resolved scores by the map alone (the one
    choice that needs no trained global branch)."""
    mode = override or cfg.image_score
    return "map" if mode == "auto" else mode


def wanted_maps(cfg: AnoPLeConfig) -> tuple[str, ...]:
    """What the config's fusion and image score read: "bank", "text" and/or GLOBAL."""
    kinds = {"bank": ["bank"], "text": ["text"]}.get(cfg.fusion, ["bank", "text"])
    mode = image_score_mode(cfg)
    if mode.startswith("global") and cfg.trains:
        kinds.append(GLOBAL)
        if mode == "global_bank" and "bank" not in kinds:
            kinds.append("bank")
    return tuple(kinds)


@torch.inference_mode()
def component_maps(model: AnoPLe, enc: Encoded, products: list[str], banks: dict[str, PatchBank],
                   text: dict[str, torch.Tensor], kinds: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The evidence before fusion, {"bank": [B, S, S], "text": [B, S, S], GLOBAL: [B]} (`kinds`, default what the
    config's fusion and image score read). Bank map: mean halved cosine distance of each patch to its nearest bank
    patch; text map: the decoder's anomaly probability; GLOBAL: z_0's abnormal probability against the product's
    text features. `banks` and `text` must hold every product of the batch."""
    cfg, S, B = model.cfg, model.image_size, len(enc)
    kinds = kinds or wanted_maps(cfg)
    maps = {}
    if "bank" in kinds:
        feats = model.bank_features(enc)  # per layer [B, HW, C]
        hw = feats[0].shape[1]
        patch = torch.empty(B, hw, device=feats[0].device)  # visual anomaly per patch
        for p in sorted(set(products)):
            rows = [i for i, q in enumerate(products) if q == p]
            queries = [f[rows].reshape(-1, f.shape[-1]) for f in feats]  # per layer [len(rows) * HW, C]
            patch[rows] = banks[p].distance(queries).reshape(len(rows), hw).to(patch.device)
        maps["bank"] = patch_scores_to_map(patch, model.grid, S, sigma=0)  # [B, S, S]
    if ("text" in kinds or GLOBAL in kinds) and text:
        t = torch.stack([text[p] for p in products]).to(enc.z0.dtype)  # [B, 2, D]
        if "text" in kinds:
            maps["text"] = pixel_map(model.text_head(enc, t)["logits"].float(), S)  # [B, S, S]
        if GLOBAL in kinds:  # L_img's image-text logits: the global branch's abnormal probability
            logits = torch.einsum("bd,bkd->bk", enc.z0, t) / cfg.temperature  # [B, 2]
            maps[GLOBAL] = logits.float().softmax(-1)[:, 1]  # [B]
    return maps


def fuse(cfg: AnoPLeConfig, maps: dict[str, torch.Tensor], products: list[str],
         scales: dict[str, dict[str, float]] | None = None, weight: float | None = None,
         score: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Component maps -> (scores [B], maps [B, S, S]) as numpy float32.

    harmonic: HM(t, b) = 2tb / (t + b) (Sec. 3.5, the paper's). HM follows the smaller input (HM ~ 2t
    when t << b), so a decoder on a smaller scale silences the bank and one on a larger scale is silenced.
    With `fusion_calibrated` each map is first divided by its own level on the product's normal
    calibration images (`scales[product]`, ProductSpec.map_scales).
    weighted: (1 - w) b / level_b + w t / level_t, both maps in units of their normal level, w from the
    config (resolved on the validation signal at training) or `weight` (the validation's own grid).
    Image score (config image_score, or `score`, the validation's own choice): map = max of the fused map;
    global_map = HM(z_0's abnormal probability, that max); global_bank = HM(z_0's probability, max of the smoothed
    bank map) (PromptAD's). Without a GLOBAL entry (no text tower) it is the map's max."""
    glob = maps.get(GLOBAL)
    spatial = {k: v for k, v in maps.items() if k != GLOBAL}
    if cfg.fusion in ("bank", "text") and cfg.fusion in spatial:  # one map alone (global_bank adds the bank's)
        amap = spatial[cfg.fusion]
    elif len(spatial) == 1:
        amap = next(iter(spatial.values()))
    else:
        t, b = spatial["text"], spatial["bank"]  # each [B, S, S]
        if cfg.fusion == "weighted" or cfg.fusion_calibrated:
            scales = scales or {}
            st = torch.tensor([scales.get(p, {}).get("text", 1.0) for p in products], device=t.device)  # [B]
            sb = torch.tensor([scales.get(p, {}).get("bank", 1.0) for p in products], device=b.device)  # [B]
            t, b = t / st.view(-1, 1, 1), b / sb.view(-1, 1, 1)
        if cfg.fusion == "weighted":
            w = weight if weight is not None else cfg.fusion_weight
            w = 0.5 if w < 0 else w  # -1 not resolved (trained without validation): equal weights
            amap = (1 - w) * b + w * t  # both maps in units of their own normal level
        else:
            amap = harmonic_fusion(t, b)
    amap = blur(amap.float(), cfg.blur_sigma)  # [B, S, S]
    img = image_score(amap)  # [B]
    mode = image_score_mode(cfg, score)
    if glob is not None and mode != "map":
        local = image_score(blur(spatial["bank"].float(), cfg.blur_sigma)) if mode == "global_bank" else img
        img = harmonic_fusion(glob.to(local.device).float(), local)  # [B]
    return img.cpu().numpy(), amap.cpu().numpy()
