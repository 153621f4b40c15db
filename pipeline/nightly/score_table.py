"""The score row's one home: the schema of the score table (one row per input row, whatever happened to it),
the constructors of its rows (`score_rows`; `error_rows` for rows none of which could be scored), and a
batch of them as an Arrow table in exactly that schema. Every stage that writes rows uses these: the scoring
actors, the unknown-product and crashed-row paths, the heatmap writer, serving. numpy and pyarrow only: Ray Data runs `to_table` in its own CPU tasks,
whose workers then import this and no more (pickled from pipeline.nightly.stages, each loaded torch, open_clip,
faiss and MLflow: 330 MB -> 1.2 GB resident, measured).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

# The night's rows. `deployment` and `date` are the partition's (scores/deployment=D/date=X/), not columns:
# hive-partitioned readers of the whole tree take them from the path, with one type.
SCORE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("product", pa.string()), ("source_uri", pa.string()),
    ("score", pa.float64()), ("is_anomalous", pa.bool_()), ("threshold", pa.float64()),
    ("model_name", pa.string()), ("model_version", pa.string()),
    ("heatmap_uri", pa.string()), ("heatmap_scale", pa.float64()),
    ("height", pa.int32()), ("width", pa.int32()),  # the source image's size (display orientation); null if undecoded
    ("status", pa.string()), ("error", pa.string()), ("run_id", pa.string()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
])


def to_table(batch: dict) -> pa.Table:
    """A score batch as an Arrow table in exactly SCORE_SCHEMA (maps and masks dropped)."""
    cols = {}
    for f in SCORE_SCHEMA:
        v = np.asarray(batch[f.name])
        if v.dtype.kind == "M":  # numpy datetime64 (UTC) -> timestamp with tz
            cols[f.name] = pa.array(v.astype("datetime64[us]")).cast(f.type)
        elif f.name in ("height", "width"):  # 0: never decoded -> null
            cols[f.name] = pa.array(v.astype(np.int64).tolist(), type=f.type, mask=v <= 0)
        else:
            cols[f.name] = pa.array(v.tolist(), type=f.type, from_pandas=True)
    return pa.table(cols, schema=SCORE_SCHEMA)


@dataclass(frozen=True)
class RunInfo:
    """Who scored: stamped on every output row."""
    deployment: str
    model_name: str
    model_version: str
    run_id: str


def score_rows(batch: dict, info: RunInfo, *, score, threshold, status, error, heatmap_uri=None,
               heatmap_scale=None) -> dict:
    """A batch's rows in SCORE_SCHEMA's columns (numpy): `batch` gives image_id and product, and source_uri,
    height and width where it has them. An error row has no score and is never anomalous."""
    n = len(batch["image_id"])
    now = np.datetime64(dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), "us")  # UTC
    status = np.asarray(status, dtype=object)
    score = np.where(status == "ok", np.asarray(score, dtype=np.float64), np.nan)
    threshold = np.asarray(threshold, dtype=np.float64)
    return {
        "image_id": batch["image_id"], "product": batch["product"],
        "source_uri": batch["source_uri"] if "source_uri" in batch else np.full(n, None, dtype=object),
        "score": score, "is_anomalous": (score > threshold) & (status == "ok"),
        "threshold": threshold,
        "model_name": np.array([info.model_name] * n, dtype=object),
        "model_version": np.array([info.model_version] * n, dtype=object),
        "heatmap_uri": np.asarray([None] * n if heatmap_uri is None else heatmap_uri, dtype=object),
        "heatmap_scale": np.full(n, np.nan) if heatmap_scale is None else np.asarray(heatmap_scale, dtype=np.float64),
        "height": np.asarray(batch["height"] if "height" in batch else np.zeros(n), dtype=np.int32),
        "width": np.asarray(batch["width"] if "width" in batch else np.zeros(n), dtype=np.int32),
        "status": status, "error": np.asarray(error, dtype=object),
        "run_id": np.array([info.run_id] * n, dtype=object), "scored_at": np.full(n, now),
    }


def error_rows(batch: dict, info: RunInfo, errors: list[str], threshold=None) -> dict:
    """Rows none of which could be scored, each with its reason; `threshold` the products' (default: none)."""
    n = len(batch["image_id"])
    return score_rows(batch, info, score=np.full(n, np.nan), threshold=np.full(n, np.nan) if threshold is None
                      else threshold, status=["error"] * n, error=errors)
