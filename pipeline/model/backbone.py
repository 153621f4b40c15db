"""Frozen open_clip backbone: creation from (architecture, weights) and patch-feature extraction.

A run is named by (architecture, weights) as in open_clip. `weights` is a hub tag (``laion400m_e32``),
a local checkpoint file, or ``random`` for an explicitly random-init backbone (tests, offline demos).
Remote URIs (s3://) are fetched to a local file by the caller (pipeline.weights); this module does no I/O
beyond what open_clip itself does.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import open_clip
import torch
from torch import nn

RANDOM = "random"
_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
# Small architectures for tests and the 2-core demo, registered next to open_clip's own configs.
open_clip.add_model_config(_CONFIG_DIR)


class BackboneLoadError(RuntimeError):
    """The backbone could not be created with the weights asked for (never silently replaced)."""


def weights_kind(weights: str) -> str:
    """'random', 'file' (a local checkpoint) or 'hub' (an open_clip pretrained tag)."""
    if weights == RANDOM:
        return "random"
    if os.path.isfile(weights):
        return "file"
    return "hub"


def create_clip(arch: str, weights: str, seed: int = 0) -> nn.Module:
    """The whole CLIP model, frozen and in eval mode.

    Random init is seeded so every Ray actor builds the *same* random backbone; the artifact stores a
    fingerprint that the scorer checks (see `fingerprint`).
    """
    if arch not in open_clip.list_models():
        raise BackboneLoadError(f"unknown open_clip architecture {arch!r}")
    kind = weights_kind(weights)
    try:
        if kind == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = open_clip.create_model(arch, pretrained=None)
        else:
            model = open_clip.create_model(arch, pretrained=weights)
    except Exception as e:
        raise BackboneLoadError(
            f"cannot load weights {weights!r} for {arch!r} ({type(e).__name__}: {e}). "
            "Pass a local checkpoint file or s3:// URI with --weights, or --weights random for an "
            "explicitly random-init backbone."
        ) from e
    model.eval().requires_grad_(False)
    return model


def fingerprint(module: nn.Module) -> str:
    """Short hash of all parameters: proves two processes hold identical backbone weights."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes()[:4096])
        h.update(str(float(p.detach().float().sum())).encode())
    return h.hexdigest()[:16]


def default_bank_layers(depth: int) -> tuple[int, ...]:
    """PromptAD's layers 3 and 8 of a 12-block ViT (1-based), scaled to the backbone's depth."""
    return tuple(sorted({max(1, round(depth * 3 / 12)), max(1, round(depth * 8 / 12))}))


@dataclass(frozen=True)
class PatchGrid:
    height: int  # patches per column
    width: int  # patches per row


class PatchFeatureExtractor(nn.Module):
    """Frozen CLIP visual tower -> L2-normalised patch tokens of chosen blocks (the memory bank's input)."""

    def __init__(self, clip: nn.Module, layers: tuple[int, ...]):
        super().__init__()
        self.visual = clip.visual
        depth = len(self.visual.transformer.resblocks)
        if not layers or min(layers) < 1 or max(layers) > depth:
            raise ValueError(f"bank layers {layers} outside 1..{depth} for this backbone")
        self.layers = tuple(layers)
        size = self.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        patch = self.visual.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.grid = PatchGrid(self.image_size // self.patch_size, self.image_size // self.patch_size)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B, 3, S, S] -> one [B, h*w, C] tensor per bank layer, unit-norm along C."""
        out = self.visual.forward_intermediates(
            x, indices=[j - 1 for j in self.layers], intermediates_only=True
        )
        feats = []
        for f in out["image_intermediates"]:  # [B, C, h, w], CLS token already dropped
            f = f.flatten(2).transpose(1, 2).float()  # [B, h*w, C]
            feats.append(torch.nn.functional.normalize(f, dim=-1))
        return feats
