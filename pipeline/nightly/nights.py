"""A night's scoring outputs, published atomically: readers see the previous complete night or the new
complete night, never a mix and never nothing.

Layout under the output root, per deployment and date:

    scores/deployment=D/date=X/scores.parquet      the night's score rows: one file, replaced in one step
    scores/deployment=D/date=X/_SUCCESS            JSON naming the run that published it (written after)
    heatmaps/deployment=D/date=X/run=<run>/<key>.png    each run's own heatmaps, named by its score rows
    _staging/scores/deployment=D/date=X/<run>/part-NNNNN.parquet   a run's rows while it runs, committed in
                                                                   parts (outside the scores tree)
    _staging/scores/deployment=D/date=X/<run>/_run.json            what the rows were scored with (resume key),
                                                                   the run's host and pid, its heartbeat

A run commits its rows to staging in parts (every `ANOPLE_STAGE_ROWS` rows or `PART_SECONDS`), each one
whole file: a run killed at 90 % leaves 90 % of the night committed, and a rerun with the same resume key (the
same model version and files, heatmap size, decoding and archive shards) adopts those rows and scores only the
rest (`plan_resume`). At the end the run's parts and the adopted ones are merged into one staged file and
published with one rename (local filesystems) or one object copy (S3, whose copy of a single object is
atomic): every reader of the scores/ tree (pandas,
pyarrow, Spark, and DuckDB's `**/*.parquet` glob, which skips no name) sees one complete night per
partition. The partition columns (`deployment`, `date`) live in the path only, so hive-partitioned readers
of the whole tree get them with one type. Heatmaps are never overwritten in place:
each run writes its own folder, so the published rows always point at a complete set; folders and staging
files of runs that ended (killed, failed, replaced) are removed after a publish, except the heatmaps that the
published rows still point at (adopted rows keep the run and heatmap of the run that scored them). Two runs of
one night at once: the last complete publish wins, and neither adopts or removes the other's files while it
runs (a run is over when MLflow says so, its process is gone from this host, or its heartbeat is stale).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage

SCORES_FILE = "scores.parquet"
MARKER = "_SUCCESS"
REPORT_FILE = "report.html"
_MAX_KEY = 180  # heatmap file name budget (most filesystems allow 255 bytes)
RUN_FILE = "_run.json"
PART_SECONDS = 60.0     # a part is committed at least this often while rows arrive
HEARTBEAT_SECONDS = 30.0


def part_rows() -> int:
    """Rows per committed staging part: what a killed run can lose at most (ANOPLE_STAGE_ROWS, 2048)."""
    return max(1, int(os.environ.get("ANOPLE_STAGE_ROWS", "2048")))


def stale_seconds() -> float:
    """A run whose heartbeat is older than this is over (killed on another host): ANOPLE_RUN_STALE_SECONDS, 600."""
    return float(os.environ.get("ANOPLE_RUN_STALE_SECONDS", "600"))


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
        """A run's staging folder: its committed parts and its _run.json."""
        return storage.join(self.staging_root, run_id)

    def run_record(self, run_id: str) -> dict | None:
        """A run's _run.json (resume key, host, pid, heartbeat), or None."""
        uri = storage.join(self.staging(run_id), RUN_FILE)
        try:
            return json.loads(storage.read_bytes(uri))
        except FileNotFoundError:
            return None

    def parts(self, run_id: str) -> list[str]:
        """A run's committed staging parts, in order."""
        try:
            files = storage.list_files(self.staging(run_id))
        except FileNotFoundError:
            return []
        return [u for u in files if u.rsplit("/", 1)[-1].startswith("part-") and u.endswith(".parquet")]

    def heatmap_prefix(self, run_id: str) -> str:
        return storage.join(self.heatmap_root, f"run={run_id}")

    def writer(self, run_id: str, schema: pa.Schema, key: dict | None = None,
               resume: "Resume | None" = None) -> "NightWriter":
        return NightWriter(self, run_id, schema, key or {}, resume)

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
                elif not tag and first.endswith(".parquet"):  # a staging file of the single-file layout
                    found.add(first[:-len(".parquet")])
                elif not tag and uri[len(root):].lstrip("/").count("/") == 1:  # <run>/<file>
                    found.add(first)
        return found

    def remove_run_files(self, run_id: str, heatmaps: bool = True) -> None:
        """Delete a run's staging rows and (unless the published rows point at them) its heatmaps; never the
        published night."""
        if heatmaps:
            storage.remove_tree(self.heatmap_prefix(run_id))
        storage.remove_tree(self.staging(run_id))
        storage.remove_tree(storage.join(self.staging_root, f"{run_id}.parquet"))


@dataclass
class Resume:
    """What a run adopts from ended runs of the same night and key: their committed rows, one per image_id,
    without the rows that failed for infrastructure reasons (those are scored again)."""
    parts: dict[str, list[str]] = field(default_factory=dict)   # run id -> its committed part URIs
    image_ids: set[str] = field(default_factory=set)            # the adopted rows' ids
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)        # ok / error / anomalous / infra_errors among them
    refused: dict[str, str] = field(default_factory=dict)       # run id -> why its rows were not adopted

    @property
    def runs(self) -> list[str]:
        return sorted(r for r, p in self.parts.items() if p)


def plan_resume(night: Night, key: dict, ended: set[str], infra_prefixes: tuple[str, ...]) -> Resume:
    """The rows a new run adopts: those committed by the `ended` runs whose _run.json carries `key`. A run of
    another key (model version, heatmap size, archive shards changed) is refused with the reason."""
    plan = Resume()
    for run in sorted(ended):
        record, parts = night.run_record(run), night.parts(run)
        if not parts:
            continue
        if record is None or record.get("key") != key:
            theirs = (record or {}).get("key", {})
            diff = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
            plan.refused[run] = ("its rows differ in " + ", ".join(
                f"{k} ({theirs.get(k)!r}, now {key.get(k)!r})" for k in diff)) if record else "it has no run record"
            continue
        taken = []
        for uri in parts:
            t = _read_part(uri, ["image_id", "status", "error", "is_anomalous"])
            if t is None:
                continue  # a part cut short (a local write stopped mid-file): its rows are scored again
            infra = [bool(e) and e.startswith(infra_prefixes) for e in t["error"].to_pylist()]
            for i, st, inf, anom in zip(t["image_id"].to_pylist(), t["status"].to_pylist(), infra,
                                        t["is_anomalous"].to_pylist()):
                if inf or i in plan.image_ids:
                    continue
                plan.image_ids.add(i)
                plan.rows += 1
                plan.counts["ok"] = plan.counts.get("ok", 0) + (st == "ok")
                plan.counts["anomalous"] = plan.counts.get("anomalous", 0) + bool(anom)
            taken.append(uri)
        plan.parts[run] = taken
    plan.counts["error"] = plan.rows - plan.counts.get("ok", 0)
    plan.counts["infra_errors"] = 0
    return plan


def _read_part(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    fs, path = storage.arrow_filesystem(uri)
    try:
        return storage.retrying(pq.read_table, path, filesystem=fs, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        return None


class NightWriter:
    """Commits one run's score rows (Arrow tables of one schema) to staging in whole parts; `publish` merges them
    with the adopted rows (a `Resume`) and makes them the night, `abort` leaves the night as it was and the
    committed parts for a rerun to adopt. While it lives, a thread keeps the run's heartbeat in _run.json."""

    def __init__(self, night: Night, run_id: str, schema: pa.Schema, key: dict, resume: Resume | None = None):
        self.night = night.uri
        self.run_id = run_id
        self.schema = schema
        self.staging = night.staging(run_id)
        self.final = storage.join(self.night, SCORES_FILE)
        self.resume = resume or Resume()
        self.rows = self.resume.rows      # rows of the night so far: adopted + committed + buffered
        self._buf: list[pa.Table] = []
        self._buffered = 0
        self._parts: list[str] = []
        self._last = time.monotonic()
        self._record = {"run_id": run_id, "key": key, "host": socket.gethostname(), "pid": os.getpid(),
                        "started_at": time.time()}
        self._beat()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="night-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        storage.write_bytes(storage.join(self.staging, RUN_FILE),
                            json.dumps(self._record | {"heartbeat": time.time()}).encode())

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._beat()
            except Exception as e:  # a store hiccup: the next beat tries again; a stale beat only lets a rerun adopt
                print(f"WARNING: night heartbeat not written ({type(e).__name__}: {e})", flush=True)

    def write(self, table: pa.Table) -> None:
        self._buf.append(table)
        self._buffered += table.num_rows
        self.rows += table.num_rows
        if self._buffered >= part_rows() or time.monotonic() - self._last >= PART_SECONDS:
            self.commit()

    def commit(self) -> None:
        """Write the buffered rows as one whole part file (a temporary name renamed on local disks; one PUT on S3)."""
        self._last = time.monotonic()
        if not self._buf:
            return
        table = pa.concat_tables(self._buf)
        uri = storage.join(self.staging, f"part-{len(self._parts):05d}.parquet")
        fs, path = storage.arrow_filesystem(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if storage.is_remote(uri):
            storage.retrying(pq.write_table, table, path, filesystem=fs)
        else:
            pq.write_table(table, path + ".tmp", filesystem=fs)
            fs.move(path + ".tmp", path)
        self._parts.append(uri)
        self._buf, self._buffered = [], 0

    def _end(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def publish(self, info: dict) -> dict:
        """Merge the adopted and committed rows into one staged file, switch the night to it in one step, drop
        what older layouts left beside it and write the marker. Returns the marker."""
        self.commit()
        self._end()
        merged = storage.join(self.staging, "_merged.parquet")
        fs, path = storage.arrow_filesystem(merged)
        writer = pq.ParquetWriter(path, self.schema, filesystem=fs)
        try:
            left = set(self.resume.image_ids)
            for run in self.resume.runs:  # adopted rows first, each once (the plan's ids)
                for uri in self.resume.parts[run]:
                    t = _read_part(uri)
                    if t is None:
                        raise RuntimeError(f"adopted staging part {uri} can no longer be read; nothing published")
                    keep = pc.is_in(t["image_id"], value_set=pa.array(sorted(left), pa.string()))
                    t = t.filter(keep)
                    # one row per adopted image_id even when two ended runs both committed it
                    first = {}
                    for n, i in enumerate(t["image_id"].to_pylist()):
                        first.setdefault(i, n)
                    t = t.take(pa.array(sorted(first.values()), pa.int64()))
                    left -= set(first)
                    writer.write_table(t.cast(self.schema))
            if left:
                raise RuntimeError(f"{len(left)} adopted rows went missing from staging; nothing published")
            for uri in self._parts:
                writer.write_table(_read_part(uri).cast(self.schema))
        finally:
            writer.close()
        final = storage.arrow_filesystem(self.final)[1]
        fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        fs.move(path, final)
        for uri in storage.list_files(self.night):
            name = uri[len(self.night):].lstrip("/")
            if name != SCORES_FILE and not name.startswith(("_", ".")):
                storage.remove_tree(uri)  # part files of the pre-publish layout
        marker = {"run_id": self.run_id, "rows": self.rows, "scores": self.final,
                  "published_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                  "resumed_from": self.resume.runs, "resumed_rows": self.resume.rows, **info}
        storage.write_bytes(storage.join(self.night, MARKER), json.dumps(marker, indent=1).encode())
        storage.remove_tree(self.staging)  # published: nothing of this run is left to adopt
        return marker

    def abort(self, discard: bool = False) -> None:
        """Leave the night as it was. The rows scored so far are committed for a rerun to adopt, unless
        `discard`."""
        self._end()
        if discard:
            storage.remove_tree(self.staging)
            return
        try:
            self.commit()
        except Exception as e:  # the run's own failure is what the caller raises; this one is only reported
            print(f"WARNING: the last {self._buffered} rows of run {self.run_id} were not committed for a rerun "
                  f"({type(e).__name__}: {e}); a rerun scores them again", flush=True)
