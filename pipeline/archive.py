"""The image archive: Parquet shards partitioned ``deployment=<d>/date=<YYYY-MM-DD>/`` (DESIGN.md)."""
from __future__ import annotations

import datetime as dt
import re

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage

SCHEMA = pa.schema([
    ("image_id", pa.string()),       # unique and stable across reruns
    ("product", pa.string()),        # class name, e.g. "screw"
    ("captured_at", pa.timestamp("us", tz="UTC")),
    ("image", pa.binary()),          # encoded JPEG/PNG/BMP/TIFF bytes, as captured
    ("split", pa.string()),          # "train" (reference normals) or "test"
    ("label", pa.int8()),            # 0 normal / 1 defective, null when unknown
    ("mask", pa.binary()),           # PNG, non-zero = defect; null when unknown or normal
    ("defect", pa.string()),         # defect type where the source names it ("good" for normals)
    ("source_uri", pa.string()),     # the file or object the row came from
])
COLUMNS = SCHEMA.names
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_deployment(deployment: str) -> str:
    if not _NAME.match(deployment or ""):
        raise ValueError(f"deployment name {deployment!r} must be letters, digits, '_', '-', '.'")
    return deployment


def check_date(date: str) -> str:
    if not _DATE.match(date or ""):
        raise ValueError(f"date {date!r} must be YYYY-MM-DD")
    dt.date.fromisoformat(date)  # rejects 2026-02-31
    return date


def partition_uri(archive: str, deployment: str, date: str | None = None) -> str:
    uri = storage.join(storage.normalize(archive), f"deployment={check_deployment(deployment)}")
    return storage.join(uri, f"date={check_date(date)}") if date else uri


class ShardWriter:
    """Streams rows into ``part-NNNNN.parquet`` shards under one partition. Opening it clears what a
    previous run wrote there, so an ingest rerun replaces rows and never duplicates them."""

    def __init__(self, archive: str, deployment: str, date: str, rows_per_shard: int = 256):
        self.partition = partition_uri(archive, deployment, date)
        self.rows_per_shard = rows_per_shard
        self.uris: list[str] = []
        self.n_rows = 0
        self._rows: list[dict] = []
        storage.remove_tree(self.partition)

    def write(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        uri = storage.join(self.partition, f"part-{len(self.uris):05d}.parquet")
        fs, path = storage.arrow_filesystem(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(pa.Table.from_pylist(self._rows, schema=SCHEMA), path, filesystem=fs)
        self.uris.append(uri)
        self.n_rows += len(self._rows)
        self._rows = []

    def close(self) -> list[str]:
        self._flush()
        return self.uris


def shard_uris(archive: str, deployment: str, date: str | None = None) -> list[str]:
    """All Parquet shards of a deployment (one date, or every date). Raises if there are none."""
    part = partition_uri(archive, deployment, date)
    try:
        files = [u for u in storage.list_files(part) if u.endswith(".parquet")]
    except FileNotFoundError:
        files = []
    if not files:
        raise FileNotFoundError(f"no archive shards at {part}")
    return files


def read_table(archive: str, deployment: str, date: str | None = None, split: str | None = None,
               products: list[str] | None = None, columns: list[str] | None = None) -> pa.Table:
    """Rows of a deployment as one Arrow table (for the few-shot train split and small evaluations;
    nightly scoring streams through Ray Data instead)."""
    uris = shard_uris(archive, deployment, date)
    fs, _ = storage.arrow_filesystem(uris[0])
    paths = [storage.arrow_filesystem(u)[1] for u in uris]
    ds = pads.dataset(paths, schema=SCHEMA, format="parquet", filesystem=fs)
    flt = None
    if split is not None:
        flt = pads.field("split") == split
    if products is not None:
        f2 = pads.field("product").isin(products)
        flt = f2 if flt is None else flt & f2
    return ds.to_table(columns=columns, filter=flt)
