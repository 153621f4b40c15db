"""Backbone weights from wherever they live (a hub tag, a local file, file://, an s3:// object), and the
frozen backbone wrapped in AnoPLe, proven by fingerprint to be the weights a model was trained on."""
from __future__ import annotations

import hashlib
import os
import tempfile

import open_clip

from pipeline import storage
from pipeline.errors import PipelineError, UsageError
from pipeline.model.anople import AnoPLe, build_tokenizer
from pipeline.model.backbone import RANDOM, BackboneLoadError, create_clip, fingerprint
from pipeline.model.config import AnoPLeConfig


class WeightsUnavailable(UsageError):
    """The backbone cannot be built with the weights asked for (never silently replaced)."""


class WeightsChanged(PipelineError):
    """The weights behind a model's URI or tag are not the ones it was trained with."""


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


def check_weights(backbone: str, weights: str) -> None:
    """Fail on the driver, before any worker starts, for an unknown architecture or hub tag."""
    if backbone not in open_clip.list_models():
        raise UsageError(f"unknown open_clip architecture {backbone!r}")
    tags = open_clip.list_pretrained_tags_by_model(backbone)
    if weights_kind(weights) == "hub" and weights not in tags:
        raise UsageError(f"{weights!r} is neither a file nor a pretrained tag of {backbone} "
                         f"(tags: {', '.join(tags) or 'none'}); pass a tag, a local file, an s3:// URI, or 'random'")


def load_clip(arch: str, weights: str, seed: int = 0):
    try:
        return create_clip(arch, local_weights(weights), seed=seed)
    except BackboneLoadError as e:
        raise WeightsUnavailable(str(e)) from e


def build_model(backbone: str, weights: str, seed: int, cfg: AnoPLeConfig, device: str,
                expect_fingerprint: str | None = None) -> AnoPLe:
    """The frozen backbone wrapped in AnoPLe; with `expect_fingerprint`, proven to be the very weights
    the model was trained with."""
    clip = load_clip(backbone, weights, seed=seed)
    if expect_fingerprint is not None:
        got = fingerprint(clip)
        if got != expect_fingerprint:
            raise WeightsChanged(
                f"backbone {backbone} with weights {weights!r} has fingerprint {got}, but the model was "
                f"trained on {expect_fingerprint}: the weights changed since training")
    return AnoPLe(clip, cfg, build_tokenizer(backbone)).to(device).eval()
