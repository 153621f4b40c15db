"""The deployment model artifact: what the registry stores and the scorer loads.

Layout of an artifact folder (local or s3://):

    model.json                  ModelSpec below (backbone, AnoPLe config, products, thresholds, ...)
    banks/<product>.npz         memory-bank patch features (the frozen CLIP's, or the prompted encoder's with
                                bank_source "prompted"), one array per layer
    prompts.safetensors         everything that trained: prompts, f_v->t / f_t->v, prefixes, decoder
    fits/, worker-*.json        per-product calibration scores and worker facts (for audits)
    manifest.json               SHA-256 of every other file, written at registration; its own SHA-256 is the
                                version's `artifact_sha256` tag (and the MLflow model's model_config)

A bank-only model (prompt_mode "none") has no prompts.safetensors.

Loading is checked (`Files`, `ModelSpec.validate`): every file a loader reads must match the manifest, the manifest
the hash the version records; thresholds must be finite and positive, file names the ones training writes. A
tampered or broken model is refused (`ModelRefused`, exit 3) with the file or field named, before any row scores.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from urllib.parse import quote

from pipeline import storage
from pipeline.errors import RefusedError, UsageError

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PROMPTS = "prompts.safetensors"


class ModelRefused(RefusedError):
    """A model folder that is not what training registered, or cannot be right: refused before any row scores."""


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
    in_prompt_training: bool = True  # False: added to a trained model without retraining (jobs.add_product)
    operating_point: dict = field(default_factory=dict)  # set by jobs.threshold: {"kind": "sensitivity" |
                              # "value", "value": S or T, "calibrated": the fit's threshold}; {} = the fit's own


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
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ModelRefused(f"model.json is not JSON ({e})") from e
        if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
            raise UsageError(f"artifact format {d.get('format_version') if isinstance(d, dict) else None} is not "
                             f"{FORMAT_VERSION}")
        try:
            d["products"] = {k: ProductSpec(**v) for k, v in d["products"].items()}
            return cls(**d)
        except (TypeError, AttributeError, KeyError) as e:
            raise ModelRefused(f"model.json does not describe a model ({type(e).__name__}: {e})") from e

    def validate(self) -> "ModelSpec":
        """Refuse a spec no training writes: thresholds that are not finite and positive (NaN, null, 0 or negative
        would turn every alarm off or on), file names other than training's (a path out of the folder), sizes
        that are not positive. Returns self."""
        def bad(what: str):
            raise ModelRefused(f"model.json of deployment {self.deployment!r}: {what}")
        if not self.products:
            bad("no products")
        for name, v in (("image_size", self.image_size), ("feature_dim", self.feature_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"{name} {v!r} is not a positive integer")
        if not self.bank_layers or not all(isinstance(x, int) and x >= 1 for x in self.bank_layers):
            bad(f"bank_layers {self.bank_layers!r} are not 1-based layers")
        if self.prompts_file not in ("", PROMPTS):
            bad(f"prompts_file {self.prompts_file!r} is not {PROMPTS!r}")
        for p, ps in self.products.items():
            t = ps.threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                bad(f"product {p!r} has threshold {t!r}: a threshold is a finite positive number")
            if ps.bank_file != bank_file(p):
                bad(f"product {p!r} names bank file {ps.bank_file!r}, not {bank_file(p)!r}")
            if not isinstance(ps.n_patches, int) or ps.n_patches <= 0:
                bad(f"product {p!r} has {ps.n_patches!r} bank patches")
            for k, v in (ps.map_scales or {}).items():
                if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    bad(f"product {p!r} has map scale {k}={v!r}")
        return self


def bank_file(product: str) -> str:
    return f"banks/{quote(product, safe='')}.npz"


def fit_file(product: str) -> str:
    """Per-product calibration record written by training (thresholds' evidence, for audits)."""
    return f"fits/{quote(product, safe='')}.json"


def save_spec(spec: ModelSpec, uri: str) -> None:
    storage.write_bytes(storage.join(uri, "model.json"), spec.to_json().encode())


def load_spec(uri: str, expected_sha256: str | None = None) -> ModelSpec:
    """The artifact's spec, validated, after every file it names (prompts, banks) was checked against the manifest
    and the manifest against `expected_sha256`: the driver refuses a changed model (exit 3) before any actor starts
    (each actor checks what it loads again: a node's cached copy can differ from the store's)."""
    files = Files(uri, expected_sha256)
    spec = ModelSpec.from_json(files.read("model.json").decode()).validate()
    if files.checked and spec.prompts_file:
        files.read(spec.prompts_file)
    for p, ps in spec.products.items():  # one bank in memory at a time
        check_bank(spec, p, bank_arrays(files.read(ps.bank_file), f"{uri}: {ps.bank_file}"), f"{uri}: {ps.bank_file}")
    return spec


def bank_arrays(data: bytes, where: str) -> list:
    """A bank file's layers ([n_patches, d_v] arrays; fitting.bank.MemoryBank.to_bytes), refused if unreadable."""
    import io

    import numpy as np
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]
    except (ValueError, OSError, KeyError, EOFError) as e:
        raise ModelRefused(f"{where} is not a bank ({type(e).__name__}: {e})") from e


def check_bank(spec: ModelSpec, product: str, layers: list, where: str) -> None:
    """Refuse a bank that is not what the spec's model searches: one [n_patches, feature_dim] array of finite
    features per bank layer (a wrong width would fail every batch, then every row, before the night stopped)."""
    import numpy as np
    ps = spec.products[product]
    if len(layers) != len(spec.bank_layers):
        raise ModelRefused(f"{where} has {len(layers)} layers; the model's bank reads {len(spec.bank_layers)}")
    for i, f in enumerate(layers):
        if f.ndim != 2 or f.shape != (ps.n_patches, spec.feature_dim):
            raise ModelRefused(f"{where} layer {i} is {list(f.shape)}, expected [{ps.n_patches}, {spec.feature_dim}]")
        if not np.issubdtype(f.dtype, np.floating) or not np.isfinite(f).all():
            raise ModelRefused(f"{where} layer {i} holds non-finite or non-float features ({f.dtype})")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(local_dir: str) -> str:
    """Write manifest.json (SHA-256 of every other file of the local artifact folder); returns its own SHA-256,
    what the registered version records."""
    files = {}
    for dirpath, _, names in os.walk(local_dir):
        for n in names:
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            if rel != MANIFEST:
                with open(full, "rb") as f:
                    files[rel] = sha256(f.read())
    data = json.dumps({"algorithm": "sha256", "files": dict(sorted(files.items()))}, indent=1).encode()
    with open(os.path.join(local_dir, MANIFEST), "wb") as f:
        f.write(data)
    return sha256(data)


class Files:
    """An artifact folder read through its manifest: each file a loader reads must hash to what the manifest says,
    and the manifest to `expected_sha256` (the registered version's record). A folder without a manifest (registered
    before manifests existed) is read unchecked, with a warning, only when no hash is expected."""

    def __init__(self, uri: str, expected_sha256: str | None = None):
        self.uri = uri
        try:
            raw = storage.read_bytes(storage.join(uri, MANIFEST))
        except FileNotFoundError:
            if expected_sha256:
                raise ModelRefused(f"{uri}: {MANIFEST} is missing, but the version records one "
                                   f"(sha256 {expected_sha256[:12]}...)") from None
            log.warning("%s has no %s (registered before model manifests): its files are not checked", uri, MANIFEST)
            self.files = None
            return
        if expected_sha256 and sha256(raw) != expected_sha256:
            raise ModelRefused(f"{uri}: {MANIFEST} is not the one registered (sha256 {sha256(raw)[:12]}..., the version "
                               f"records {expected_sha256[:12]}...): the model folder was changed")
        try:
            self.files = dict(json.loads(raw)["files"])
        except (ValueError, KeyError, TypeError) as e:
            raise ModelRefused(f"{uri}: {MANIFEST} is unreadable ({type(e).__name__}: {e})") from e

    @property
    def checked(self) -> bool:
        return self.files is not None

    def read(self, rel: str) -> bytes:
        data = storage.read_bytes(storage.join(self.uri, rel))
        if self.files is not None:
            want = self.files.get(rel)
            if want is None:
                raise ModelRefused(f"{self.uri}: {rel} is not in the model's manifest")
            if sha256(data) != want:
                raise ModelRefused(f"{self.uri}: {rel} was changed after registration (sha256 {sha256(data)[:12]}..., "
                                   f"the manifest records {want[:12]}...)")
        return data


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
