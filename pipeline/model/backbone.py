"""Frozen open_clip backbone: creation from (architecture, weights) and patch-feature extraction.

A run is named by (architecture, weights) as in open_clip. `weights` is a hub tag (``laion400m_e32``),
a local checkpoint file, or ``random`` for an explicitly random-init backbone (tests, offline demos).
Remote URIs (s3://) are fetched to a local file by the caller (pipeline.fitting.weights); this module does no I/O
beyond what open_clip itself does.
"""
from __future__ import annotations

import hashlib
import os

import open_clip
import torch
from torch import nn

RANDOM = "random"
_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
# Small architectures for tests and the 2-core demo, registered next to open_clip's own configs.
open_clip.add_model_config(_CONFIG_DIR)


class BackboneLoadError(RuntimeError):
    """The backbone could not be created with the weights asked for (never silently replaced)."""


def create_clip(arch: str, weights: str, seed: int = 0) -> nn.Module:
    """The whole CLIP model, frozen and in eval mode.

    Random init is seeded so every Ray actor builds the *same* random backbone; the artifact stores a
    fingerprint that the scorer checks (see `fingerprint`).
    """
    if arch not in open_clip.list_models():
        raise BackboneLoadError(f"unknown open_clip architecture {arch!r}")
    try:
        if weights == RANDOM:
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
    """Short hash of every parameter's bytes: proves two processes hold identical backbone weights.

    Exact bytes, never a float sum: a sum's rounding depends on the thread count (a Ray worker runs
    1 thread, a driver many), which made the same weights look different.
    """
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def looks_untrained(module: nn.Module) -> bool:
    """True when every LayerNorm still holds its initial affine (weight 1, bias 0), as in a random-init
    CLIP and never in a trained one: random weights are recognised by what they are, whatever the file
    or argument they came from (`random`, `file://random`, a random init saved to a checkpoint)."""
    norms = [m for m in module.modules() if isinstance(m, nn.LayerNorm) and m.elementwise_affine]
    return bool(norms) and all(bool((m.weight == 1).all()) and (m.bias is None or bool((m.bias == 0).all()))
                               for m in norms)
