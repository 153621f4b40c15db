"""The deployment model artifact: what the registry stores and the scorer loads.

Layout of an artifact folder (local or s3://):

    model.json                  ModelSpec below (backbone, AnoPLe config, products, thresholds, ...)
    banks/<product>.npz         memory-bank patch features (the frozen CLIP's, or the prompted encoder's with
                                bank_source "prompted"), one array per layer
    prompts.safetensors         everything that trained: prompts, f_v->t / f_t->v, prefixes, decoder
    fits/, worker-*.json        per-product calibration scores and worker facts (for audits)

A bank-only model (prompt_mode "none") has no prompts.safetensors.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from urllib.parse import quote

from pipeline import storage
from pipeline.errors import UsageError

log = logging.getLogger(__name__)
FORMAT_VERSION = 2


@dataclass
class ProductSpec:
    threshold: float          # image score above this -> is_anomalous
    calibration: str          # where the threshold came from: "heldout_normals" | "shots_leave_one_out" | "shots_augmented"
    n_calibration: int        # normal images behind the threshold
    shots: list[str]          # image_ids of the K normal shots in the bank
    n_patches: int            # bank size per layer
    bank_file: str            # relative path of the bank inside the artifact
    map_scales: dict = field(default_factory=dict)  # {"text", "bank"}: each map's level on the normal
                                                    # calibration images (calibrated fusion); {} = 1
    class_name: str = ""      # the words the product's prompts use ("" in artifacts from before: its name)


@dataclass
class ModelSpec:
    deployment: str
    backbone: str             # open_clip architecture
    weights: str              # what the user passed: hub tag, file/URI, or "random"
    weights_kind: str         # "hub" | "file" | "random"; "random" blocks promotion
    weights_fingerprint: str  # hash of the backbone's parameters, checked by the scorer
    seed: int
    image_size: int
    bank_layers: list[int]    # 1-based transformer blocks feeding the memory bank
    shots: int                # K normal shots per product
    feature_dim: int          # width of the bank features (the ViT width)
    anople: dict = field(default_factory=dict)  # AnoPLeConfig.to_dict(), bank_layers resolved
    prompts_file: str = ""    # "prompts.safetensors", or "" for a bank-only model
    products: dict[str, ProductSpec] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def is_random(self) -> bool:
        return self.weights_kind == "random"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        d = json.loads(text)
        if d.get("format_version") != FORMAT_VERSION:
            raise UsageError(f"artifact format {d.get('format_version')} is not {FORMAT_VERSION}")
        d["products"] = {k: ProductSpec(**v) for k, v in d["products"].items()}
        return cls(**d)


def bank_file(product: str) -> str:
    return f"banks/{quote(product, safe='')}.npz"


def fit_file(product: str) -> str:
    """Per-product calibration record written by training (thresholds' evidence, for audits)."""
    return f"fits/{quote(product, safe='')}.json"


def save_spec(spec: ModelSpec, uri: str) -> None:
    storage.write_bytes(storage.join(uri, "model.json"), spec.to_json().encode())


def load_spec(uri: str) -> ModelSpec:
    return ModelSpec.from_json(storage.read_bytes(storage.join(uri, "model.json")).decode())


def bank_bytes(spec: ModelSpec, product: str) -> int:
    """Memory a product's bank takes as float32 features (what the per-actor budget counts)."""
    return spec.products[product].n_patches * len(spec.bank_layers) * spec.feature_dim * 4


def plan_shards(spec: ModelSpec, budget_mb: float | None) -> list[list[str]]:
    """Pack products into bank shards of at most `budget_mb` each (first-fit by decreasing size), one actor
    pool per shard. A product larger than the budget alone gets a shard of its own (and a warning)."""
    products = sorted(spec.products)
    if not budget_mb:
        return [products]
    budget = budget_mb * 2**20
    shards: list[tuple[int, list[str]]] = []
    for p in sorted(products, key=lambda p: (-bank_bytes(spec, p), p)):
        size = bank_bytes(spec, p)
        if size > budget:
            log.warning("bank of %s (%.1f MB) exceeds the per-actor budget (%.1f MB)", p, size / 2**20, budget_mb)
        for i, (used, members) in enumerate(shards):
            if used + size <= budget:
                shards[i] = (used + size, members + [p])
                break
        else:
            shards.append((size, [p]))
    return [sorted(m) for _, m in shards]
