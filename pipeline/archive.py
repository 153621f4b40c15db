"""The image archive: Parquet shards partitioned ``deployment=<d>/date=<YYYY-MM-DD>/`` (DESIGN.md)."""
from __future__ import annotations

import datetime as dt
import re
from urllib.parse import quote

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
    """Streams rows into per-product shards ``part-<product>-NNNNN.parquet`` under one partition.

    The first row of a product clears that product's shards from a previous run, so a rerun replaces
    rows and never duplicates them, and ingesting product B into a night leaves product A's rows alone.
    """

    def __init__(self, archive: str, deployment: str, date: str, rows_per_shard: int = 256):
        self.partition = partition_uri(archive, deployment, date)
        self.rows_per_shard = rows_per_shard
        self.uris: list[str] = []
        self.n_rows = 0
        self._rows: dict[str, list[dict]] = {}
        self._count: dict[str, int] = {}

    def _prefix(self, product: str) -> str:
        return "part-" + quote(product, safe="") + "-"

    def write(self, row: dict) -> None:
        p = row["product"]
        if p not in self._rows:
            self._clear(p)
            self._rows[p], self._count[p] = [], 0
        self._rows[p].append(row)
        if len(self._rows[p]) >= self.rows_per_shard:
            self._flush(p)

    def _clear(self, product: str) -> None:
        try:
            old = storage.list_files(self.partition)
        except FileNotFoundError:
            return
        for uri in old:
            if uri.rsplit("/", 1)[-1].startswith(self._prefix(product)):
                storage.remove_tree(uri)

    def _flush(self, product: str) -> None:
        rows = self._rows[product]
        if not rows:
            return
        uri = storage.join(self.partition, f"{self._prefix(product)}{self._count[product]:05d}.parquet")
        fs, path = storage.arrow_filesystem(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, filesystem=fs)
        self.uris.append(uri)
        self.n_rows += len(rows)
        self._count[product] += 1
        self._rows[product] = []

    def close(self) -> list[str]:
        for p in list(self._rows):
            self._flush(p)
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
