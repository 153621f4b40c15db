"""The image archive: Parquet shards partitioned ``deployment=<d>/date=<YYYY-MM-DD>/``, and the one way to
list and filter a partition's rows (pyarrow here; Ray Data's reader in pipeline.nightly.stages uses the same filter)."""
from __future__ import annotations

import datetime as dt
import functools
import operator
import re
import uuid
from dataclasses import dataclass
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import NotFoundError, UsageError

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
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")  # fullmatch: "$" would also match before a trailing newline
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # fullmatch, as _DATE


def check_deployment(deployment: str) -> str:
    if not _NAME.fullmatch(deployment or ""):
        raise UsageError(f"deployment name {deployment!r} must be letters, digits, '_', '-', '.'")
    return deployment


def check_product(product: str) -> str:
    if not _NAME.fullmatch(product or ""):
        raise UsageError(f"product name {product!r} must be letters, digits, '_', '-', '.' (starting with a letter or digit)")
    return product


def check_date(date: str) -> str:
    try:
        if not _DATE.fullmatch(date or ""):
            raise ValueError("not YYYY-MM-DD")
        dt.date.fromisoformat(date)  # rejects 2026-02-31
    except ValueError as e:
        raise UsageError(f"date {date!r} must be a calendar date YYYY-MM-DD ({e})") from None
    return date


def resolve_date(text: str, timezone: str = "UTC") -> str:
    """'today' / 'yesterday' (the calendar day in `timezone`, when the job starts: what a scheduled job
    names, since its command line is fixed) or a YYYY-MM-DD date -> YYYY-MM-DD."""
    if text in ("today", "yesterday"):
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
        try:
            zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise UsageError(f"unknown time zone {timezone!r} (an IANA name, e.g. UTC or Europe/Berlin)") from None
        day = dt.datetime.now(zone).date() - dt.timedelta(days=1 if text == "yesterday" else 0)
        return day.isoformat()
    return check_date(text)


def partition_uri(archive: str, deployment: str, date: str | None = None) -> str:
    uri = storage.join(storage.normalize(archive), f"deployment={check_deployment(deployment)}")
    return storage.join(uri, f"date={check_date(date)}") if date else uri


_SHARD = re.compile(r"^part-(?P<product>.+?)(?:-w(?P<write>[0-9a-f]{12}))?-(?P<n>\d{5})\.parquet$")


def shard_product(name: str) -> str | None:
    """The product a shard file belongs to, from its exact name (``part-<product>[-w<write>]-NNNNN.parquet``;
    the write id is absent in shards of older ingests), or None for any other file."""
    m = _SHARD.fullmatch(name)
    return unquote(m["product"]) if m else None


SHARD_BYTES = 128 * 2**20     # a shard is flushed at this many bytes of images and masks (or rows_per_shard rows)
ROW_GROUP_BYTES = 32 * 2**20  # about this many bytes of images per row group


def _row_bytes(row: dict) -> int:
    return sum(len(row.get(k) or b"") for k in ("image", "mask"))


class ShardWriter:
    """Streams rows into per-product shards ``part-<product>-w<write>-NNNNN.parquet`` under one partition.

    Atomic per ingest: new shards get this writer's own write id, so they never overwrite anything;
    `close` then removes the earlier shards of exactly the products written (matched by the product
    parsed from the name: ``tile`` never touches ``tile-2``), and `abort` removes only what this writer
    wrote, so a failed ingest changes nothing. Between the last new shard and the removal of the old ones
    a reader can see a product's rows twice (the object store has no multi-file switch); it never sees a
    product without rows.
    """

    def __init__(self, archive: str, deployment: str, date: str, rows_per_shard: int = 256,
                 bytes_per_shard: int = SHARD_BYTES, row_group_bytes: int = ROW_GROUP_BYTES):
        self.partition = partition_uri(archive, deployment, date)
        self.rows_per_shard = rows_per_shard
        self.bytes_per_shard = bytes_per_shard
        self.row_group_bytes = row_group_bytes
        self.write_id = uuid.uuid4().hex[:12]
        self.uris: list[str] = []
        self.n_rows = 0
        self._rows: dict[str, list[dict]] = {}
        self._bytes: dict[str, int] = {}
        self._count: dict[str, int] = {}

    @property
    def pending(self) -> int:
        return sum(len(r) for r in self._rows.values())

    def write(self, row: dict) -> None:
        p = row["product"]
        if p not in self._rows:
            self._rows[p], self._count[p], self._bytes[p] = [], 0, 0
        self._rows[p].append(row)
        self._bytes[p] += _row_bytes(row)
        # by rows or by bytes, whichever comes first: 256 images of 20 MB must not sit in memory (then an Arrow copy)
        if len(self._rows[p]) >= self.rows_per_shard or self._bytes[p] >= self.bytes_per_shard:
            self._flush(p)

    def _flush(self, product: str) -> None:
        rows = self._rows[product]
        if not rows:
            return
        name = f"part-{quote(product, safe='')}-w{self.write_id}-{self._count[product]:05d}.parquet"
        uri = storage.join(self.partition, name)
        fs, path = storage.arrow_filesystem(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        # row groups of at most ~row_group_bytes of images: readers (report, reruns, Ray Data) read whole groups
        per_group = max(1, int(len(rows) * self.row_group_bytes / max(self._bytes[product], 1)))
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, filesystem=fs, row_group_size=per_group)
        self.uris.append(uri)
        self.n_rows += len(rows)
        self._count[product] += 1
        self._rows[product], self._bytes[product] = [], 0

    def close(self) -> list[str]:
        """Write what is buffered, then remove the written products' earlier shards. Returns the new shards."""
        for p in list(self._rows):
            self._flush(p)
        mine = set(self.uris)
        for uri in storage.list_files(self.partition) if self.uris else []:
            if uri not in mine and shard_product(uri.rsplit("/", 1)[-1]) in self._rows:
                storage.remove_tree(uri)
        return self.uris

    def abort(self) -> None:
        """Remove every shard this writer wrote; the partition is as it was."""
        for uri in self.uris:
            storage.remove_tree(uri)
        self.uris, self._rows = [], {}


def shard_uris(archive: str, deployment: str, date: str | None = None) -> list[str]:
    """All Parquet shards of a deployment (one date, or every date). Raises if there are none."""
    part = partition_uri(archive, deployment, date)
    try:  # names starting with '_' or '.' are hidden, as every Parquet reader treats them
        files = [u for u in storage.list_files(part) if u.endswith(".parquet")
                 and not any(seg.startswith(("_", ".")) for seg in u[len(part):].split("/"))]
    except FileNotFoundError:
        files = []
    if not files:
        raise NotFoundError(f"no archive shards at {part}")
    return files


def shard_paths(archive: str, deployment: str, date: str | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """(Arrow filesystem, shard paths inside it): what pyarrow and Ray Data readers take. An explicit file
    list, so readers add no Hive partition columns."""
    uris = shard_uris(archive, deployment, date)
    fs, _ = storage.arrow_filesystem(uris[0])
    return fs, [storage.arrow_filesystem(u)[1] for u in uris]


@dataclass(frozen=True)
class Rows:
    """Which rows of a deployment's partition to read: one split or all, some products or all (with
    `exclude`, every row *not* of `products`, rows with a null product included)."""
    split: str | None = None
    products: tuple[str, ...] | None = None
    exclude: bool = False
    image_ids: tuple[str, ...] | None = None  # only these rows (a rerun of some rows)

    def predicate(self, field=pads.field):
        """The filter as one expression built from `field(name)`: pyarrow's by default; Ray Data's `col`
        builds the same filter for its reader (its membership test is `is_in`, pyarrow's `isin`)."""
        def isin(name, values):
            expr = field(name)
            return (getattr(expr, "is_in", None) or expr.isin)(list(values))

        terms = []
        if self.products is not None:
            product = field("product")
            inside = isin("product", self.products)
            # a null product is in no list: it belongs with the excluded (error) rows, never nowhere
            terms.append((~inside | product.is_null()) if self.exclude else inside)
        if self.split is not None:
            terms.append(field("split") == self.split)
        if self.image_ids is not None:
            terms.append(isin("image_id", self.image_ids))
        return functools.reduce(operator.and_, terms) if terms else None


@dataclass(frozen=True)
class Partition:
    """One deployment's rows in the archive, of one date (a night) or of every date (None). Its shards are
    listed once, on first use, and every read takes them from that list."""
    archive: str
    deployment: str
    date: str | None = None

    @functools.cached_property
    def shards(self) -> tuple[pafs.FileSystem, list[str]]:
        """(Arrow filesystem, shard paths inside it), listed on first use (shard_paths)."""
        return shard_paths(self.archive, self.deployment, self.date)

    def __getstate__(self) -> dict:  # the listed shards (and their filesystem's credentials) never travel
        return {"archive": self.archive, "deployment": self.deployment, "date": self.date}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def read_table(self, rows: Rows = Rows(), columns: list[str] | None = None) -> pa.Table:
        """Its rows as one Arrow table (for the few-shot train split, routing and small evaluations; nightly
        scoring streams through Ray Data instead)."""
        fs, paths = self.shards
        ds = pads.dataset(paths, schema=SCHEMA, format="parquet", filesystem=fs)
        return storage.retrying(ds.to_table, columns=columns, filter=rows.predicate())

    def read_images(self, image_ids: list[str]) -> dict[str, bytes]:
        """{image_id: image bytes} for a few rows, e.g. the report's top-N, reading the image column only of
        the row groups that hold them: a filter on the dataset would read every image of the partition."""
        want, out = set(image_ids), {}
        fs, paths = self.shards
        for path in paths:
            pf = pq.ParquetFile(fs.open_input_file(path))
            for g in range(pf.num_row_groups):
                ids = pf.read_row_group(g, columns=["image_id"])["image_id"].to_pylist()
                if want.intersection(ids):
                    t = pf.read_row_group(g, columns=["image_id", "image"])
                    out.update((i, b) for i, b in zip(ids, t["image"].to_pylist()) if i in want)
            if len(out) == len(want):
                break
        return out

    def image_ids(self, rows: Rows = Rows()) -> list[str]:
        return self.read_table(rows, columns=["image_id"])["image_id"].to_pylist()

    def count_rows(self) -> int:
        return self.read_table(columns=["image_id"]).num_rows


def read_table(archive: str, deployment: str, date: str | None = None, rows: Rows = Rows(),
               columns: list[str] | None = None) -> pa.Table:
    """Partition.read_table of a partition read once."""
    return Partition(archive, deployment, date).read_table(rows, columns)


def read_images(archive: str, deployment: str, date: str | None, image_ids: list[str]) -> dict[str, bytes]:
    """Partition.read_images of a partition read once."""
    return Partition(archive, deployment, date).read_images(image_ids)


def products_in(archive: str, deployment: str) -> list[str]:
    """The products with train-split (reference) images: what a deployment's model covers."""
    table = read_table(archive, deployment, rows=Rows(split="train"), columns=["product"])
    products = sorted(set(table["product"].to_pylist()) - {None})
    if not products:
        raise NotFoundError(f"deployment {deployment!r} has no train-split images in {archive}")
    return products


def product_counts(archive: str, deployment: str, date: str | None, rows: Rows = Rows()) -> dict:
    """Rows per product (None for a missing product) in the partition, from the product column alone."""
    counts: dict = {}
    for p in read_table(archive, deployment, date, rows, columns=["product"])["product"].to_pylist():
        counts[p] = counts.get(p, 0) + 1
    return counts


def repeated(ids: pa.ChunkedArray) -> frozenset[str]:
    """The image_ids that more than one row carries (ingest never writes them; a shard written by other
    tools can)."""
    counts = pa.table({"image_id": ids}).group_by("image_id").aggregate([("image_id", "count")])
    return frozenset(counts.filter(pc.field("image_id_count") > 1)["image_id"].to_pylist()) - {None}
