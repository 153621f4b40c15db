"""Nightly scoring with Ray Data: read shards -> decode (CPU tasks) -> score (actor pools holding the
banks) -> write heatmaps (CPU tasks after GPU actors; in the actor on CPU) -> one output row per input row.

Routing: the products' banks are packed into shards no larger than the per-actor budget; each shard gets
its own actor pool, and only rows of its products flow to it. Rows that cannot be scored (undecodable
image, product the model does not know) skip the actors and become ``status=error`` rows, so rows out
always equals rows in.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import pyarrow as pa

from pipeline import archive, artifact, storage
from pipeline.images import ImageDecodeError, decode_image, decode_mask, encode_heatmap, resize_mask, to_model_input

log = logging.getLogger(__name__)

SCORE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("deployment", pa.string()), ("product", pa.string()),
    ("score", pa.float64()), ("is_anomalous", pa.bool_()), ("threshold", pa.float64()),
    ("model_name", pa.string()), ("model_version", pa.string()),
    ("heatmap_uri", pa.string()), ("heatmap_scale", pa.float64()),
    ("status", pa.string()), ("error", pa.string()), ("run_id", pa.string()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
])


@dataclass(frozen=True)
class RunInfo:
    deployment: str
    date: str
    model_name: str
    model_version: str
    run_id: str
    output: str = ""             # output root; "" = no heatmaps (evaluation)
    keep_maps: bool = False      # pass maps/masks on (evaluation streams them into metrics)


def plan_shards(spec: artifact.ModelSpec, budget_mb: float | None) -> list[list[str]]:
    """Pack products into bank shards of at most `budget_mb` each (first-fit by decreasing size).
    A product larger than the budget alone gets a shard of its own (and a warning)."""
    products = sorted(spec.products)
    if not budget_mb:
        return [products]
    budget = budget_mb * 2**20
    shards: list[tuple[int, list[str]]] = []
    for p in sorted(products, key=lambda p: (-artifact.bank_bytes(spec, p), p)):
        size = artifact.bank_bytes(spec, p)
        if size > budget:
            log.warning("bank of %s (%.1f MB) exceeds the per-actor budget (%.1f MB)", p, size / 2**20, budget_mb)
        for i, (used, members) in enumerate(shards):
            if used + size <= budget:
                shards[i] = (used + size, members + [p])
                break
        else:
            shards.append((size, [p]))
    return [sorted(m) for _, m in shards]


def heatmap_uri(output: str, deployment: str, date: str, image_id: str) -> str:
    """Deterministic key: a rerun overwrites, never duplicates."""
    return storage.join(output, "heatmaps", f"deployment={deployment}", f"date={date}", quote(image_id, safe="") + ".png")


def scores_uri(output: str, deployment: str, date: str) -> str:
    return storage.join(output, "scores", f"deployment={deployment}", f"date={date}")


def _labels(values) -> np.ndarray:
    """Archive labels (0/1, null -> None or NaN in numpy) -> int8 with -1 for unknown."""
    return np.array([-1 if v is None or (isinstance(v, float) and np.isnan(v)) else int(v) for v in values],
                    dtype=np.int8)


def decode_batch(batch: dict, image_size: int, keep_masks: bool) -> dict:
    """CPU task: image bytes -> model input. Failures become status/error, never exceptions."""
    n = len(batch["image_id"])
    pixels = np.zeros((n, 3, image_size, image_size), dtype=np.float32)
    hw = np.zeros((n, 2), dtype=np.int32)
    status, error = ["ok"] * n, [""] * n
    masks = np.zeros((n, image_size, image_size), dtype=bool) if keep_masks else None
    for i in range(n):
        try:
            rgb = decode_image(batch["image"][i])
            pixels[i] = to_model_input(rgb, image_size)
            hw[i] = rgb.shape[:2]
            if keep_masks:
                m = batch["mask"][i]
                full = decode_mask(m if m is not None else None, rgb.shape[:2])
                if full.shape != rgb.shape[:2]:
                    raise ImageDecodeError(f"mask shape {full.shape} differs from image {rgb.shape[:2]}")
                masks[i] = resize_mask(full, image_size)
        except Exception as e:  # decode_image already words its own errors; anything else is reported as is
            status[i], error[i] = "error", str(e) if isinstance(e, ImageDecodeError) else f"{type(e).__name__}: {e}"
    out = {"image_id": batch["image_id"], "product": batch["product"], "pixels": pixels,
           "height": hw[:, 0], "width": hw[:, 1], "status": np.array(status), "error": np.array(error)}
    if keep_masks:
        out["mask"] = masks
        out["label"] = _labels(batch["label"])
    return out


def _rows(batch: dict, info: RunInfo, score, thr, uri, scale, status, error, maps=None) -> dict:
    n = len(batch["image_id"])
    now = np.datetime64(dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), "us")  # UTC
    out = {
        "image_id": batch["image_id"], "deployment": np.array([info.deployment] * n, dtype=object),
        "product": batch["product"], "score": np.asarray(score, dtype=np.float64),
        "is_anomalous": np.asarray(score, dtype=np.float64) > np.asarray(thr, dtype=np.float64),
        "threshold": np.asarray(thr, dtype=np.float64),
        "model_name": np.array([info.model_name] * n, dtype=object),
        "model_version": np.array([info.model_version] * n, dtype=object),
        "heatmap_uri": np.asarray(uri, dtype=object), "heatmap_scale": np.asarray(scale, dtype=np.float64),
        "status": np.asarray(status, dtype=object), "error": np.asarray(error, dtype=object),
        "run_id": np.array([info.run_id] * n, dtype=object), "scored_at": np.full(n, now),
    }
    bad = out["status"] != "ok"
    out["is_anomalous"][bad] = False
    if info.keep_maps:
        out["map"] = maps if maps is not None else np.zeros((n, 1, 1), dtype=np.float16)
        out["mask"], out["label"] = batch["mask"], batch["label"]
    return out


def unknown_product_rows(batch: dict, info: RunInfo, known: list[str]) -> dict:
    """Rows whose product has no bank in this model: error rows, never dropped."""
    n = len(batch["image_id"])
    nan = np.full(n, np.nan)
    errors = [f"unknown product {p!r}: model {info.model_name} v{info.model_version} knows {', '.join(known)}"
              for p in batch["product"]]
    if info.keep_maps:
        batch = {**batch, "mask": np.zeros((n, 1, 1), dtype=bool),
                 "label": _labels(batch["label"])}
    return _rows(batch, info, nan, nan, [None] * n, nan, ["error"] * n, errors,
                 np.zeros((n, 1, 1), dtype=np.float16) if info.keep_maps else None)


class ScoreActor:
    """Holds one bank shard; loads the artifact from storage in __init__ (survives actor restarts)."""

    def __init__(self, artifact_uri: str, products: list[str], info: RunInfo, write_maps: bool = True):
        from pipeline.scorer import Scorer
        self.scorer = Scorer.load(artifact_uri, products)
        self.info = info
        self.write_maps = write_maps  # False: a CPU stage after this actor writes the heatmaps

    def _score_rows(self, pixels, products):
        try:
            s, m = self.scorer.score(pixels, products)
            return [(s[i], m[i], None) for i in range(len(products))]
        except Exception:  # isolate the failing row(s); a batch never fails as a whole
            out = []
            for i in range(len(products)):
                try:
                    s, m = self.scorer.score(pixels[i:i + 1], products[i:i + 1])
                    out.append((s[0], m[0], None))
                except Exception as e:
                    out.append((np.nan, None, f"scoring failed: {type(e).__name__}: {e}"))
            return out

    def __call__(self, batch: dict) -> dict:
        info, spec = self.info, self.scorer.spec
        products = [str(p) for p in batch["product"]]
        n = len(products)
        status, error = list(batch["status"]), list(batch["error"])  # decode errors pass straight through
        todo = [i for i in range(n) if status[i] == "ok"]
        results = dict(zip(todo, self._score_rows(batch["pixels"][todo], [products[i] for i in todo]))) if todo else {}
        score, thr, scale = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        # maps leave the actor for the heatmap writer (float32: the PNG gets 16 bits) or for evaluation
        maps = None
        if info.output or info.keep_maps:
            maps = np.zeros((n, spec.image_size, spec.image_size), dtype=np.float32 if info.output else np.float16)
        for i, (s, amap, err) in results.items():
            if err:
                status[i], error[i] = "error", err
                continue
            score[i] = s
            if maps is not None:
                maps[i] = amap
        thr[:] = [spec.products[p].threshold for p in products]
        out = _rows(batch, info, score, thr, [None] * n, scale, status, error, maps)
        if info.output:  # what write_heatmaps needs; it drops these columns again
            out.update(map=maps, height=batch["height"], width=batch["width"])
            if self.write_maps:
                return write_heatmaps(out, info)
        return out


def write_heatmaps(batch: dict, info: RunInfo) -> dict:
    """Each scored row's map -> 16-bit PNG at the image's own resolution, at its deterministic key. With
    GPU actors this is a CPU stage after them, so the GPU actor only scores (encoding in the actor held the
    H100 job to the PNG encoder's pace); CPU actors call it themselves (a separate stage would need a CPU
    the actors may all hold). A failed write turns its row into an error row; it never fails the batch."""
    n = len(batch["image_id"])
    status, error = list(batch["status"]), list(batch["error"])
    uri = [None] * n
    scale = np.full(n, np.nan)
    for i in range(n):
        if status[i] != "ok":
            continue
        try:
            png, scale[i] = encode_heatmap(batch["map"][i], int(batch["height"][i]), int(batch["width"][i]))
            uri[i] = heatmap_uri(info.output, info.deployment, info.date, str(batch["image_id"][i]))
            storage.write_bytes(uri[i], png)
        except Exception as e:
            status[i], error[i], uri[i], scale[i] = "error", f"heatmap write failed: {type(e).__name__}: {e}", None, np.nan
    out = {k: v for k, v in batch.items() if k not in ("height", "width") and (k != "map" or info.keep_maps)}
    out.update(heatmap_uri=np.asarray(uri, dtype=object), heatmap_scale=scale,
               status=np.asarray(status, dtype=object), error=np.asarray(error, dtype=object))
    out["is_anomalous"] = out["is_anomalous"] & (out["status"] == "ok")
    return out


def read_rows(archive_uri: str, deployment: str, date: str | None, columns: list[str],
              products: list[str] | None = None, exclude: bool = False, split: str | None = None):
    """The partition's shards as a Ray Dataset, filtered to (or, with `exclude`, away from) `products`
    and to one split at read time. An explicit file list, so no Hive partition columns are added."""
    import ray.data
    from ray.data.expressions import col

    uris = archive.shard_uris(archive_uri, deployment, date)
    fs, _ = storage.arrow_filesystem(uris[0])
    paths = [storage.arrow_filesystem(u)[1] for u in uris]
    extra = ["split"] if split is not None and "split" not in columns else []
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(columns + extra)
    flt = None
    if products is not None:
        flt = col("product").is_in(list(products))
        # a null product is in no list: it belongs with the excluded (error) rows, never nowhere
        flt = (~flt | col("product").is_null()) if exclude else flt
    if split is not None:
        f2 = col("split") == split
        flt = f2 if flt is None else flt & f2
    if flt is not None:
        ds = ds.filter(expr=flt)  # Arrow-native predicate, pushed down where Ray can
    return ds.drop_columns(extra) if extra else ds


def product_counts(archive_uri: str, deployment: str, date: str | None, split: str | None = None) -> dict:
    """Rows per product (None for a missing product) in the partition, from the product column alone."""
    t = archive.read_table(archive_uri, deployment, date, split=split, columns=["product"])
    counts: dict = {}
    for p in t["product"].to_pylist():
        counts[p] = counts.get(p, 0) + 1
    return counts


def score_partition(archive_uri: str, deployment: str, date: str | None, artifact_uri: str,
                    spec: artifact.ModelSpec, info: RunInfo, split: str | None = None,
                    budget_mb: float | None = None, actors_per_shard: int = 1, batch_size: int = 16,
                    use_gpu: bool = False, only: list[str] | None = None):
    """Archive rows -> Datasets of score rows (SCORE_SCHEMA, plus map/mask/label with keep_maps): one
    for the rows of unknown products (error rows), then one per bank shard.

    Each bank shard reads only its products' rows, decodes them in CPU tasks and scores them in its own
    actor pool. Callers run the datasets one after another: run together, N shards' pools would need N
    actors' resources at once and deadlock a small cluster; one at a time, each shard gets the whole
    cluster and only one shard's banks are in memory per actor.
    """
    import ray.data

    known = sorted(spec.products)
    present = product_counts(archive_uri, deployment, date, split)
    branches = []
    if only is None and any(p not in spec.products for p in present):
        cols = ["image_id", "product"] + (["label"] if info.keep_maps else [])
        branches.append(read_rows(archive_uri, deployment, date, cols, known, exclude=True, split=split)
                        .map_batches(unknown_product_rows, batch_format="numpy",
                                     fn_kwargs={"info": info, "known": known}))
    cols = ["image_id", "product", "image"] + (["label", "mask"] if info.keep_maps else [])
    for products in plan_shards(spec, budget_mb):
        if only is not None:  # evaluation of some products only (e.g. the unseen one)
            products = [p for p in products if p in only]
        if not any(p in present for p in products):
            continue  # no rows tonight for this shard: start no actor for it
        rows = read_rows(archive_uri, deployment, date, cols, products, split=split)
        decoded = rows.map_batches(decode_batch, batch_format="numpy", batch_size=batch_size,
                                   fn_kwargs={"image_size": spec.image_size, "keep_masks": info.keep_maps})
        scored = decoded.map_batches(
            ScoreActor, batch_format="numpy", batch_size=batch_size,
            fn_constructor_kwargs={"artifact_uri": artifact_uri, "products": products, "info": info,
                                   "write_maps": not use_gpu},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors_per_shard)),
            num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)
        if info.output and use_gpu:
            scored = scored.map_batches(write_heatmaps, batch_format="numpy", fn_kwargs={"info": info})
        branches.append(scored)
    return branches


def to_table(batch: dict) -> pa.Table:
    """A score batch as an Arrow table in exactly SCORE_SCHEMA (maps and masks dropped)."""
    cols = {}
    for f in SCORE_SCHEMA:
        v = np.asarray(batch[f.name])
        if v.dtype.kind == "M":  # numpy datetime64 (UTC) -> timestamp with tz
            cols[f.name] = pa.array(v.astype("datetime64[us]")).cast(f.type)
        else:
            cols[f.name] = pa.array(v.tolist(), type=f.type, from_pandas=True)
    return pa.table(cols, schema=SCORE_SCHEMA)
