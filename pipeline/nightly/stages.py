"""Batch scoring with Ray Data: read shards -> decode (CPU tasks) -> score (actor pools holding the banks)
-> either write heatmaps (nightly) or carry maps and masks on to the metrics (evaluation).

Every scoring actor returns one schema, SCORE_SCHEMA plus ``map`` [S, S] float32, ``height``/``width`` of
the source image, and the decoded ``mask``/``label`` when the run evaluates. The heatmap writer turns that
into the score table's rows; it is a CPU stage after GPU actors, and runs inside CPU actors (a separate
stage would need a CPU that CPU actors may all hold: ScoreAndWriteActor).

Routing: the products' banks are packed into shards no larger than the per-actor budget; each shard gets
its own actor pool, and only rows of its products flow to it. Rows that cannot be scored (undecodable
image, product the model does not know) skip the actors and become ``status=error`` rows, so rows out
always equals rows in.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import ray.data
import ray.exceptions
import torch
from ray.data.context import DEFAULT_TARGET_MAX_BLOCK_SIZE
from ray.data.expressions import col

from pipeline import artifact, storage
from pipeline.cluster import cluster_gpus, worker_resources
from pipeline.heap import keep_large_blocks_on_heap, release_freed_memory
from pipeline.nightly.nights import heatmap_key
from pipeline.nightly.score_table import RunInfo, error_rows, score_rows
from pipeline.nightly.scorer import Scorer
from pipeline.sources import archive
from pipeline.sources.decoding import decode_batch, labels
from pipeline.sources.device_decode import DeviceDecoder, raw_pixels
from pipeline.sources.images import encode_heatmap, heatmap_scale

EVAL_COLUMNS = ("mask", "label")  # decoded ground truth, carried past the actors when evaluating
# Bounded: Ray Data's defaults restart actors and retry tasks without end, so one image that kills its
# process would keep a night running forever. Past these, the night isolates the rows (nightly.score_night).
TASK_RETRIES = 3     # decode, unknown-product and heatmap-writer tasks
ACTOR_RESTARTS = 2   # a scoring actor's process dying (and each task's retries on it)
CRASHES = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)  # a process died, retries spent


@dataclass(frozen=True)
class InjectedFault:
    """Test-only fault on the rows with these image_ids: "crash" kills the scoring process (os._exit) as a
    native crash would; "raise" makes scoring raise, as a failing device would. Only the Python API takes it
    (nightly.score_night's `fault`): no job flag, nothing in the data can trigger it."""
    image_ids: frozenset[str]
    kind: str = "crash"  # crash | raise

    def crash(self, image_ids) -> None:
        if self.kind == "crash" and self.image_ids & {str(i) for i in image_ids}:
            os._exit(70)

    def fail(self, image_ids) -> None:
        if self.kind == "raise" and self.image_ids & {str(i) for i in image_ids}:
            raise RuntimeError("injected fault")


@dataclass(frozen=True)
class HeatmapTarget:
    """Where a run's heatmaps go (nights.heatmap_prefix): one deterministic key per image_id; stored with the
    long side at most `side` pixels (None: at the image's full resolution)."""
    prefix: str
    side: int | None = None

    def uri(self, image_id: str) -> str:
        return storage.join(self.prefix, heatmap_key(image_id))


def unknown_product_rows(batch: dict, info: RunInfo, known: list[str]) -> dict:
    """Rows whose product has no bank in this model: error rows in the actors' schema, never dropped."""
    n = len(batch["image_id"])
    errors = [f"unknown product {p!r}: model {info.model_name} v{info.model_version} knows {', '.join(known)}"
              for p in batch["product"]]
    out = error_rows(batch, info, errors)
    out.update(map=np.zeros((n, 1, 1), dtype=np.float32), height=np.zeros(n, np.int32), width=np.zeros(n, np.int32))
    if "label" in batch:
        out.update(mask=np.zeros((n, 1, 1), dtype=bool), label=labels(batch["label"]))
    return out


class ScoreActor:
    """Holds one bank shard; loads the artifact in __init__ (survives actor restarts) from where the
    registry says it is, fetched on this actor's own node when it is behind a tracking server. Returns the
    batch's score rows with their maps (``map``), for the heatmap writer or the metrics after it."""

    def __init__(self, artifact_uri: str, products: list[str], info: RunInfo, fault: InjectedFault | None = None,
                 cpu_share: int = 1, artifact_sha256: str | None = None):
        keep_large_blocks_on_heap()  # before the first forward: no page faults for its activations (pipeline.heap)
        if not storage.is_storage_uri(artifact_uri):  # behind a tracking server: MLflow fetches it here
            from pipeline import registry  # MLflow's import (~2 s of CPU) only where it is needed
            artifact_uri = registry.materialize(artifact_uri)
        self._hold(Scorer.load(artifact_uri, products, expected_sha256=artifact_sha256), info, fault)
        if self.scorer.device == "cpu":
            # Ray pins a num_cpus=1 actor's torch to one thread (OMP_NUM_THREADS=1), yet on a CPU node the
            # forward is ~90% of the work (decode ~5 ms, forward ~100+ ms an image): the actor takes its share
            # of the node's cores (`cpu_share` actors per node), the decode tasks interleave
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, cpu_share)))

    def _hold(self, scorer: Scorer, info: RunInfo, fault: InjectedFault | None) -> None:
        self.scorer, self.info, self.fault = scorer, info, fault
        self.batches = 0
        self.decoder = None  # device_decode.DeviceDecoder, made on the first JPEG bytes that reach the actor

    @classmethod
    def around(cls, scorer: Scorer, info: RunInfo) -> "ScoreActor":
        """The actor's call on a scorer already built in this process (no artifact to load, no Ray): the
        benchmarks time it."""
        actor = cls.__new__(cls)
        actor._hold(scorer, info, None)
        return actor

    def _device_pixels(self, batch: dict, todo: list[int], status: list, error: list) -> torch.Tensor:
        """The model's uint8 input [n, 3, S, S] on this actor's device from decode_batch(on_device=True) rows:
        `raw` pixels the CPU decoded, `jpeg` bytes decoded here (device_decode); a JPEG nothing can decode
        turns its row into an error row."""
        S, dev = self.scorer.model.image_size, self.scorer.device
        x = torch.zeros(len(batch["image_id"]), 3, S, S, dtype=torch.uint8, device=dev)
        raw = [i for i in todo if len(batch["raw"][i])]
        if raw:
            x[raw] = torch.from_numpy(raw_pixels([batch["raw"][i] for i in raw], S)).to(dev)
        rows = [i for i in todo if len(batch["jpeg"][i])]
        if rows:
            if self.decoder is None:
                self.decoder = DeviceDecoder(S, dev)
            x[rows], errors = self.decoder([batch["jpeg"][i] for i in rows], [int(batch["orientation"][i]) for i in rows],
                                           [(int(batch["height"][i]), int(batch["width"][i])) for i in rows])
            for i, e in zip(rows, errors):
                if e is not None:
                    status[i], error[i] = "error", e
        return x

    def _score_rows(self, pixels, products, image_ids):
        try:
            if self.fault is not None:
                self.fault.fail(image_ids)
            s, m = self.scorer.score(pixels, products)
            return [(s[i], m[i], None) for i in range(len(products))]
        except Exception:  # isolate the failing row(s); a batch never fails as a whole
            out = []
            for i in range(len(products)):
                try:
                    if self.fault is not None:
                        self.fault.fail(image_ids[i:i + 1])
                    s, m = self.scorer.score(pixels[i:i + 1], products[i:i + 1])
                    out.append((s[0], m[0], None))
                except Exception as e:
                    out.append((np.nan, None, f"scoring failed: {type(e).__name__}: {e}"))
            return out

    def __call__(self, batch: dict) -> dict:
        if self.fault is not None:
            self.fault.crash(batch["image_id"])
        products = [str(p) for p in batch["product"]]
        n, S = len(products), self.scorer.model.image_size
        status, error = list(batch["status"]), list(batch["error"])  # decode errors pass straight through
        todo = [i for i in range(n) if status[i] == "ok"]
        pixels = batch["pixels"] if "pixels" in batch else self._device_pixels(batch, todo, status, error)
        todo = [i for i in todo if status[i] == "ok"]
        results = dict(zip(todo, self._score_rows(pixels[todo], [products[i] for i in todo],
                                                  [str(batch["image_id"][i]) for i in todo]))) if todo else {}
        score = np.full(n, np.nan)
        maps = np.zeros((n, S, S), dtype=np.float32)  # float32: the heatmap PNG gets 16 bits of it
        for i, (s, amap, err) in results.items():
            if err:
                status[i], error[i] = "error", err
            elif not np.isfinite(s):  # NaN weights or an overflow: no number is no verdict, never a silent "ok"
                status[i], error[i] = "error", f"scoring failed: the model gave a non-finite score ({s})"
            else:
                score[i], maps[i] = s, amap
        thr = [self.scorer.thresholds[p] for p in products]
        out = score_rows(batch, self.info, score=score, threshold=thr, status=status, error=error)
        out.update(map=maps, height=batch["height"], width=batch["width"])
        out.update({k: batch[k] for k in EVAL_COLUMNS if k in batch})
        self.batches += 1
        if self.batches % 8 == 0:
            release_freed_memory()
        return out


class ScoreAndWriteActor(ScoreActor):
    """A CPU node's scoring actor: scores, then writes the batch's heatmaps itself and returns its score rows (a
    separate writer stage would need a CPU that CPU actors may all hold)."""

    def __init__(self, artifact_uri: str, products: list[str], info: RunInfo, heatmaps: HeatmapTarget,
                 fault: InjectedFault | None = None, cpu_share: int = 1, artifact_sha256: str | None = None):
        super().__init__(artifact_uri, products, info, fault, cpu_share, artifact_sha256)
        self.heatmaps = heatmaps

    def __call__(self, batch: dict) -> dict:
        return write_heatmaps(super().__call__(batch), self.heatmaps)


def write_heatmaps(batch: dict, target: HeatmapTarget) -> dict:
    """Each scored row's map -> 16-bit PNG on its product's fixed scale (images.heatmap_scale: from the row's
    threshold), at the target's resolution, at its deterministic key; the map column is dropped. A failed write turns its row into an error row (no score, like every error row:
    a reader keeping status == "ok" never takes a score without its heatmap); it never fails the batch."""
    n = len(batch["image_id"])
    status, error = list(batch["status"]), list(batch["error"])
    uri = [None] * n
    scale = np.full(n, np.nan)
    for i in range(n):
        if status[i] != "ok":
            continue
        try:
            scale[i] = heatmap_scale(float(batch["threshold"][i]), batch["map"][i])
            png = encode_heatmap(batch["map"][i], int(batch["height"][i]), int(batch["width"][i]), scale[i], target.side)
            uri[i] = target.uri(str(batch["image_id"][i]))
            storage.write_bytes(uri[i], png)
        except Exception as e:
            status[i], error[i], uri[i], scale[i] = "error", f"heatmap write failed: {type(e).__name__}: {e}", None, np.nan
    out = {k: v for k, v in batch.items() if k != "map"}
    out["score"] = np.where(np.asarray(status, dtype=object) == "ok", out["score"], np.nan)
    out.update(heatmap_uri=np.asarray(uri, dtype=object), heatmap_scale=scale,
               status=np.asarray(status, dtype=object), error=np.asarray(error, dtype=object))
    out["is_anomalous"] = out["is_anomalous"] & (out["status"] == "ok")
    return out


FOOTER_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
SHARDS_PER_FOOTER_READER = 50


@contextlib.contextmanager
def footer_readers(n_files: int):
    """Ray Data lists parquet files by reading their footers on a pool of FooterReader actors of a fixed size
    per read whatever the file count (its env knob, read when read_parquet is called), so a night of a few
    shards would start and kill dozens of worker processes, each costing start-up CPU. Sized to the shards
    here (one reader per 50 files, at most Ray's 32), unless the operator set the knob."""
    if FOOTER_ENV in os.environ:
        yield
        return
    os.environ[FOOTER_ENV] = str(min(32, max(1, -(-n_files // SHARDS_PER_FOOTER_READER))))
    try:
        yield
    finally:
        os.environ.pop(FOOTER_ENV, None)


# Ray Data fills a map task's output block up to DataContext.target_max_block_size (128 MB by default) before
# handing it on: dozens of decoded batches held in every decode worker's private memory, and the actor's first
# batch waits for them. Decoded blocks of a couple of
# the actor's batches keep that buffer small and the actors fed from the first batches.
DECODED_BATCHES_PER_BLOCK = 2


def decoded_block_bytes(batch_size: int, image_size: int, with_masks: bool) -> int:
    """Target bytes of a decoded block: DECODED_BATCHES_PER_BLOCK actor batches of uint8 [3, S, S] pixels (+ an
    [S, S] bool mask each when evaluating), never above Ray's default."""
    row = 3 * image_size ** 2 + (image_size ** 2 if with_masks else 0)
    return min(DEFAULT_TARGET_MAX_BLOCK_SIZE, DECODED_BATCHES_PER_BLOCK * max(1, batch_size) * row)


@contextlib.contextmanager
def block_target(nbytes: int):
    """Datasets created inside get `nbytes` as their target block size (a Dataset keeps a copy of the context
    current when its source was created, and every dataset derived from it shares that copy)."""
    ctx = ray.data.DataContext.get_current()
    before, ctx.target_max_block_size = ctx.target_max_block_size, nbytes
    try:
        yield
    finally:
        ctx.target_max_block_size = before


def decoded_rows(partition: archive.Partition, products: list[str], image_size: int, *,
                 split: str | None = None, image_ids: tuple[str, ...] | None = None, with_masks: bool = False,
                 duplicates: frozenset = frozenset(), batch_size: int = 16, on_device: bool = False):
    """The rows of `products` as a Dataset of model-ready uint8 pixels (decoding.decode_batch in CPU tasks),
    in blocks of a few `batch_size` batches; with `on_device`, JPEGs the actor decodes stay bytes."""
    cols = ["image_id", "product", "source_uri", "image"] + (list(EVAL_COLUMNS) if with_masks else [])
    with block_target(decoded_block_bytes(batch_size, image_size, with_masks)):
        rows = read_rows(partition, cols, archive.Rows(split, tuple(products), image_ids=image_ids))
    return rows.map_batches(decode_batch, batch_format="numpy", batch_size=batch_size, max_retries=TASK_RETRIES,
                            fn_kwargs={"image_size": image_size, "with_masks": with_masks, "duplicates": duplicates,
                                       "on_device": on_device})


def read_rows(partition: archive.Partition, columns: list[str], rows: archive.Rows):
    """The partition's shards as a Ray Dataset of `columns`, filtered by `rows` at read time."""
    fs, paths = partition.shards
    extra = ["split"] if rows.split is not None and "split" not in columns else []
    with footer_readers(len(paths)):
        ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(columns + extra)
    predicate = rows.predicate(col)
    if predicate is not None:
        ds = ds.filter(expr=predicate)  # Arrow-native predicate, pushed down where Ray can
    return ds.drop_columns(extra) if extra else ds


def gpus_per_actor(gpus: float, actors: int) -> float:
    """What each GPU scoring actor asks Ray for: a whole GPU, or an equal share of the cluster's GPUs when a
    shard has more actors than there are GPUs (so that all of them start)."""
    return min(1.0, gpus / max(1, actors))


def score_partition(partition: archive.Partition, artifact_uri: str, spec: artifact.ModelSpec, info: RunInfo, *,
                    split: str | None = None,
                    heatmaps: HeatmapTarget | None = None, with_masks: bool = False, only: list[str] | None = None,
                    image_ids: tuple[str, ...] | None = None, budget_mb: float | None = None,
                    actors_per_shard: int = 1, batch_size: int = 16, use_gpu: bool = False,
                    actor_restarts: int = ACTOR_RESTARTS, fault: InjectedFault | None = None,
                    decode_on_device: bool = False, artifact_sha256: str | None = None) -> list:
    """Archive rows -> Datasets of scored rows: one for the rows of unknown products (error rows), then
    one per bank shard. With `heatmaps` the maps are written and dropped (the score table's rows); without,
    each row keeps its map (and with `with_masks` its mask and label) for the metrics. `only` scores just
    those products (e.g. the unseen one of leave-one-product-out), `image_ids` just those rows. With
    `decode_on_device` the actors decode the JPEGs they can (device_decode), the CPU tasks the rest. Each actor
    checks the files it loads against the artifact's manifest, and the manifest against `artifact_sha256` (the
    registered version's record).

    Each bank shard reads only its products' rows, decodes them in CPU tasks and scores them in its own
    actor pool. With GPUs, more actors than the cluster has GPUs share them (each takes GPUs/actors of one):
    an actor's host work (its batch in and maps out through the object store, the rows' columns) then overlaps
    another's work on the device instead of leaving the GPU idle. Callers run the datasets one after another: run together, N shards' pools would need N
    actors' resources at once and deadlock a small cluster; one at a time, each shard gets the whole
    cluster and only one shard's banks are in memory per actor.
    """
    known = sorted(spec.products)
    index = partition.read_table(archive.Rows(split=split, image_ids=image_ids),
                                 columns=["image_id", "product"])  # one read for routing and the duplicate check
    present = set(index["product"].to_pylist())
    # an image_id is unique within a night; across dates (an evaluation of every date) it may recur
    duplicates = archive.repeated(index["image_id"]) if partition.date is not None else frozenset()
    branches = []
    if only is None and any(p not in spec.products for p in present):
        cols = ["image_id", "product", "source_uri"] + (["label"] if with_masks else [])
        branches.append(read_rows(partition, cols, archive.Rows(split, tuple(known), exclude=True, image_ids=image_ids))
                        .map_batches(unknown_product_rows, batch_format="numpy", max_retries=TASK_RETRIES,
                                     fn_kwargs={"info": info, "known": known}))
    for products in artifact.plan_shards(spec, budget_mb):
        if only is not None:
            products = [p for p in products if p in only]
        if not any(p in present for p in products):
            continue  # no rows tonight for this shard: start no actor for it
        decoded = decoded_rows(partition, products, spec.image_size, split=split,
                               image_ids=image_ids, with_masks=with_masks, duplicates=duplicates, batch_size=batch_size,
                               on_device=decode_on_device)
        # CPU actors write their own heatmaps; GPU actors hand them to a CPU stage, so they only score
        actors = max(1, actors_per_shard)
        gpu_share = gpus_per_actor(cluster_gpus(), actors) if use_gpu else 0
        writes = heatmaps is not None and not use_gpu
        scored = decoded.map_batches(
            ScoreAndWriteActor if writes else ScoreActor, batch_format="numpy", batch_size=batch_size,
            fn_constructor_kwargs={"artifact_uri": artifact_uri, "products": products, "info": info, "fault": fault,
                                   "cpu_share": actors, "artifact_sha256": artifact_sha256,
                                   **({"heatmaps": heatmaps} if writes else {})},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
            num_gpus=gpu_share, num_cpus=0 if use_gpu else 1, resources=worker_resources() or None,
            max_restarts=actor_restarts, max_task_retries=actor_restarts)
        if heatmaps is not None and use_gpu:
            scored = scored.map_batches(write_heatmaps, batch_format="numpy", max_retries=TASK_RETRIES,
                                        fn_kwargs={"target": heatmaps})
        branches.append(scored)
    return branches


INFRA_ERRORS = ("scoring failed", "heatmap write failed", "scoring process crashed")  # not the image's fault


def isolating(build: Callable[[tuple[str, ...] | None, int], Iterator[pa.Table]], all_ids: Callable[[], list[str]],
              crashed_row: Callable[[str, str], pa.Table], start: tuple[str, ...] | None = None,
              retry_after: Callable[[BaseException, int], bool] | None = None) -> Iterator[pa.Table]:
    """The score tables of `build(None, ACTOR_RESTARTS)` (the whole night), each row once. When a scoring
    process dies again and again (its bounded retries spent), the rows already produced are kept and the
    rest is split in halves and run again, down to single rows: a row that still kills its process becomes
    `crashed_row(image_id, reason)`, an error row, and the night goes on. Halves get no restarts (a crash
    just splits them further); a single row gets one, so a passing fault does not condemn it. `start`: only
    these rows (a resumed night's rest), with the whole night's restarts. Any other failure of a build is the
    night's, unless `retry_after(error, rows left)` says to run the rows it left again whole (a lost node took
    one of Ray Data's own tasks or actors with it, which Ray does not retry)."""
    done: set[str] = set()
    if start is not None and not start:
        return
    todo: list[tuple[tuple[str, ...] | None, int]] = [(start, ACTOR_RESTARTS)]  # (rows, actor restarts)
    while todo:
        subset, restarts = todo.pop()
        try:
            for table in build(subset, restarts):
                done.update(table["image_id"].to_pylist())
                yield table
        except CRASHES as e:
            rest = list(dict.fromkeys(i for i in (all_ids() if subset is None else subset) if i not in done))
            if len(rest) == 1:
                done.add(rest[0])
                yield crashed_row(rest[0], f"scoring process crashed on this image, retries spent "
                                           f"({type(e).__name__})")
            elif rest:
                half = len(rest) // 2
                todo += [(tuple(r), 1 if len(r) == 1 else 0) for r in (rest[half:], rest[:half])]
        except Exception as e:
            rest = list(dict.fromkeys(i for i in (all_ids() if subset is None else subset) if i not in done))
            if not rest or retry_after is None or not retry_after(e, len(rest)):
                raise
            todo.append((tuple(rest), restarts))
