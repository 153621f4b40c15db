"""Backbone weights from wherever they live: a hub tag, a local file, file://, or an s3:// object."""
from __future__ import annotations

import hashlib
import os
import tempfile

from pipeline import storage
from pipeline.model.backbone import RANDOM, create_clip


def local_weights(weights: str, cache_dir: str | None = None) -> str:
    """Map `weights` to what open_clip accepts: remote URIs are downloaded once into a cache folder."""
    if weights == RANDOM:
        return weights
    if weights.startswith("file://"):
        return weights[len("file://"):]
    if storage.is_remote(weights):
        cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "anople-weights")
        os.makedirs(cache_dir, exist_ok=True)
        name = hashlib.sha256(weights.encode()).hexdigest()[:16] + "-" + os.path.basename(weights)
        local = os.path.join(cache_dir, name)
        if not os.path.exists(local):
            tmp = local + f".part{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(storage.read_bytes(weights))
            os.replace(tmp, local)  # atomic: concurrent actors never read half a file
        return local
    return weights  # a hub tag or a local path


def weights_kind(weights: str) -> str:
    if weights == RANDOM:
        return "random"
    if storage.is_remote(weights) or weights.startswith("file://") or os.path.isfile(weights):
        return "file"
    return "hub"


def load_clip(arch: str, weights: str, seed: int = 0):
    return create_clip(arch, local_weights(weights), seed=seed)
