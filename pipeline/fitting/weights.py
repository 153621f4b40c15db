"""Backbone weights from wherever they live (a hub tag, a local file, file://, an s3:// object), and the
frozen backbone wrapped in AnoPLe, proven by fingerprint to be the weights a model was trained on."""
from __future__ import annotations

import hashlib
import os

import huggingface_hub.constants
import open_clip
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

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
        # this user's only: what is in it is loaded as the backbone
        cache_dir = storage.private_dir(cache_dir or os.environ.get("ANOPLE_WEIGHTS_CACHE")
                                        or storage.user_temp("anople-weights"))
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


def check_weights(backbone: str, weights: str, hf_cache: str | None = None) -> None:
    """Fail on the driver, before any worker starts, for an unknown architecture or hub tag, or for a hub
    tag that cannot be had here (see `hub_weights_cached`)."""
    if backbone not in open_clip.list_models():
        raise UsageError(f"unknown open_clip architecture {backbone!r}")
    tags = open_clip.list_pretrained_tags_by_model(backbone)
    if weights_kind(weights) == "hub" and weights not in tags:
        raise UsageError(f"{weights!r} is neither a file nor a pretrained tag of {backbone} "
                         f"(tags: {', '.join(tags) or 'none'}); pass a tag, a local file, an s3:// URI, or 'random'")
    if weights_kind(weights) == "hub" and huggingface_hub.constants.HF_HUB_OFFLINE \
            and hub_weights_cached(backbone, weights, hf_cache) is False:
        # Deterministic, so said here: raised in a Ray Train worker it would be retried (Ray Train retries
        # every worker failure), three worker-group starts for the same answer.
        raise WeightsUnavailable(
            f"cannot load weights {weights!r} for {backbone!r}: HF_HUB_OFFLINE is set and the Hugging Face "
            f"cache ({hf_cache or huggingface_hub.constants.HF_HUB_CACHE}) does not hold them. Fetch them once "
            "online, or pass a local checkpoint file or s3:// URI with --weights.")


def hub_weights_cached(backbone: str, weights: str, hf_cache: str | None = None) -> bool | None:
    """Whether open_clip's Hugging Face file for (backbone, tag) is in the local HF cache; None when the tag
    has no HF file (open_clip then downloads a URL, which HF_HUB_OFFLINE does not govern)."""
    hub = open_clip.get_pretrained_cfg(backbone, weights).get("hf_hub", "")
    if not hub:
        return None
    repo, name = os.path.split(hub)  # 'org/model/file' or 'org/model/' (open_clip's default file name)
    names = [name or HF_WEIGHTS_NAME]
    if names[0] == HF_WEIGHTS_NAME:
        names.append(HF_SAFE_WEIGHTS_NAME)  # open_clip prefers a .safetensors twin where one exists
    elif names[0].endswith((".bin", ".pth")):
        names.append(names[0][:-4] + ".safetensors")
    return any(isinstance(try_to_load_from_cache(repo, n, cache_dir=hf_cache), str) for n in names)


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
