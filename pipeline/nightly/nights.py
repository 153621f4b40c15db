"""A night's scoring outputs, published atomically: readers see the previous complete night or the new
complete night, never a mix and never nothing.

Layout under the output root, per deployment and date:

    scores/deployment=D/date=X/scores.parquet      the night's score rows: one file, replaced in one step
    scores/deployment=D/date=X/_SUCCESS            JSON naming the run that published it (written after)
    heatmaps/deployment=D/date=X/run=<run>/<key>.png    each run's own heatmaps, named by its score rows
    _staging/scores/deployment=D/date=X/<run>.parquet   a run's rows while it runs (outside the scores tree)

A run streams its rows into its staging file, then publishes with one rename (local filesystems) or one
object copy (S3, whose copy of a single object is atomic): every reader of the scores/ tree (pandas,
pyarrow, Spark, and DuckDB's `**/*.parquet` glob, which skips no name) sees one complete night per
partition. The partition columns (`deployment`, `date`) live in the path only, so hive-partitioned readers
of the whole tree get them with one type. Heatmaps are never overwritten in place:
each run writes its own folder, so the published rows always point at a complete set; folders and staging
files of runs that ended (killed, failed, replaced) are removed after a publish. Two runs of one night at
once: the last complete publish wins, and neither removes the other's files while it runs.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

SCORES_FILE = "scores.parquet"
MARKER = "_SUCCESS"
REPORT_FILE = "report.html"
_MAX_KEY = 180  # heatmap file name budget (most filesystems allow 255 bytes)


def heatmap_key(image_id: str) -> str:
    """A file name for any image_id: URL-quoted; past the length budget, a readable head plus a hash of the
    whole id (distinct ids stay distinct, the same id always maps to the same key)."""
    key = quote(image_id, safe="")
    if len(key) > _MAX_KEY:
        head = quote(image_id[:60], safe="")[:120].rstrip("%0123456789ABCDEF") or "id"
        key = f"{head}~{hashlib.sha256(image_id.encode()).hexdigest()[:32]}"
    return key + ".png"


@dataclass(frozen=True)
class Night:
    """One night's outputs under an output root (local or s3://), normalised once: where its rows are
    staged and published, where each run's heatmaps and the night's report go, and which runs left files."""
    output: str
    deployment: str
    date: str

    def __post_init__(self):
        object.__setattr__(self, "output", storage.normalize(self.output))

    def _under(self, tree: str) -> str:
        return storage.join(self.output, tree, f"deployment={self.deployment}", f"date={self.date}")

    @property
    def uri(self) -> str:
        """The published night: scores/deployment=D/date=X/."""
        return self._under("scores")

    @property
    def heatmap_root(self) -> str:
        return self._under("heatmaps")

    @property
    def report_uri(self) -> str:
        """reports/deployment=D/date=X/report.html: beside the scores/ tree, not in it (no reader of the
        scores tree meets a file that is not scores)."""
        return storage.join(self._under("reports"), REPORT_FILE)

    @property
    def staging_root(self) -> str:
        """_staging/scores/deployment=D/date=X/: every run's rows while it runs, outside the scores tree."""
        return self._under(storage.join("_staging", "scores"))

    def staging(self, run_id: str) -> str:
        return storage.join(self.staging_root, f"{run_id}.parquet")

    def heatmap_prefix(self, run_id: str) -> str:
        return storage.join(self.heatmap_root, f"run={run_id}")

    def writer(self, run_id: str, schema: pa.Schema) -> "NightWriter":
        return NightWriter(self, run_id, schema)

    def published(self) -> dict | None:
        """The marker of the night's current publish (which run, how many rows), or None if never published."""
        uri = storage.join(self.uri, MARKER)
        return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None

    def runs_with_files(self) -> set[str]:
        """Run ids that left heatmaps or staging rows for the night."""
        found = set()
        for root, tag in ((self.heatmap_root, "run="), (self.staging_root, "")):
            try:
                files = storage.list_files(root)
            except FileNotFoundError:
                continue
            for uri in files:
                first = uri[len(root):].lstrip("/").split("/")[0]
                if tag and first.startswith(tag):
                    found.add(first[len(tag):])
                elif not tag and first.endswith(".parquet"):
                    found.add(first[:-len(".parquet")])
        return found

    def remove_run_files(self, run_id: str) -> None:
        """Delete a run's heatmaps and staging rows (never the published night)."""
        storage.remove_tree(self.heatmap_prefix(run_id))
        storage.remove_tree(self.staging(run_id))


class NightWriter:
    """Streams one run's score rows (Arrow tables of one schema) to its staging file; `publish` makes them
    the night, `abort` leaves the night as it was."""

    def __init__(self, night: Night, run_id: str, schema: pa.Schema):
        self.night = night.uri
        self.run_id = run_id
        self.staging = night.staging(run_id)
        self.final = storage.join(self.night, SCORES_FILE)
        self.fs, path = storage.arrow_filesystem(self.staging)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self._writer = pq.ParquetWriter(path, schema, filesystem=self.fs)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows

    def publish(self, info: dict) -> dict:
        """Switch the night to this run's rows in one step, then drop what older layouts left beside them
        and write the marker. Returns the marker."""
        self._writer.close()
        final = storage.arrow_filesystem(self.final)[1]
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        self.fs.move(storage.arrow_filesystem(self.staging)[1], final)
        for uri in storage.list_files(self.night):
            name = uri[len(self.night):].lstrip("/")
            if name != SCORES_FILE and not name.startswith(("_", ".")):
                storage.remove_tree(uri)  # part files of the pre-publish layout
        marker = {"run_id": self.run_id, "rows": self.rows, "scores": self.final,
                  "published_at": dt.datetime.now(dt.timezone.utc).isoformat(), **info}
        storage.write_bytes(storage.join(self.night, MARKER), json.dumps(marker, indent=1).encode())
        return marker

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            storage.remove_tree(self.staging)
