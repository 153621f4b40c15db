"""Scoring one night, top to bottom: the archive partition's rows through the scoring actors (pipeline.nightly.stages),
published atomically under the output night (pipeline.nightly.nights), its report written beside it, one MLflow run.

A night travels as three values: the input `archive.Partition` (its shards listed once), the output
`nights.Night` (its locations normalised once) and the run's `ScoreOptions` (parsed once by jobs.score).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import sys
import time

import numpy as np
import pyarrow.compute as pc

from pipeline import artifact, lineage, registry, storage
from pipeline.cluster import alive_nodes, cluster_gpus, has_gpus
from pipeline.errors import PipelineError, UsageError
from pipeline.nightly import drift, nights, report
from pipeline.nightly.score_table import SCORE_SCHEMA, RunInfo, error_rows, to_table
from pipeline.nightly.stages import INFRA_ERRORS, HeatmapTarget, InjectedFault, isolating, score_partition
from pipeline.progress import Progress
from pipeline.sources import archive
from pipeline.sources.decoding import decode_where


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """How a night is scored: what `jobs.score` parses (its flags have these names), checked here once."""
    model_alias: str = "production"
    bank_budget_mb: float | None = None   # per-actor bank budget; banks above it are sharded by product
    actors_per_shard: int | None = None   # scoring actors per bank shard; default one per GPU, 1 without GPUs
    batch_size: int = 16
    max_error_rate: float = 0.05          # infrastructure failures the night may lose before nothing is published
    heatmap_side: int | None = None       # stored heatmaps' long side; default the model's input size
    heatmap_full_res: bool = False        # store each heatmap at its image's own resolution instead
    decode: str = "auto"                  # where JPEGs are decoded: decoding.DECODE_CHOICES
    resume: bool = True                   # adopt the rows that ended runs of this night committed (same resume key)
    skip_published: bool = False          # the night is published with the same resume key: rescore nothing

    def __post_init__(self):
        decode_where(self.decode, False)  # a wrong value fails before any run starts
        if self.heatmap_side is not None and self.heatmap_side < 1:
            raise UsageError("--heatmap-side must be a positive number of pixels")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.actors_per_shard is not None and self.actors_per_shard < 1:
            raise UsageError("--actors-per-shard must be at least 1")
        if not 0 <= self.max_error_rate <= 1:
            raise UsageError("--max-error-rate is a fraction between 0 and 1")

    def heatmaps(self, night: nights.Night, run_id: str, image_size: int) -> HeatmapTarget:
        """Where this run's heatmaps go and at what size."""
        return HeatmapTarget(night.heatmap_prefix(run_id), None if self.heatmap_full_res
                             else self.heatmap_side or image_size)


NODE_LOSS_RETRIES = 3  # times a night's unscored rows run again after a lost node failed its stream


class TooManyErrors(PipelineError):
    """More rows failed for infrastructure reasons than the night may lose; nothing was published."""


def score_night(partition: archive.Partition, output: str, options: ScoreOptions = ScoreOptions(),
                fault: InjectedFault | None = None) -> dict:
    """Score one night's partition and publish its score rows and heatmaps under `output` atomically
    (pipeline.nightly.nights): a run that fails or is killed leaves the previous night as it was. A row that kills
    its scoring process again and again is isolated into an error row (stages.isolating). More than
    `options.max_error_rate` of rows failing for infrastructure reasons fails the run: nothing is published.
    `fault` is a test's injected crash. Returns a summary."""
    deployment, date = partition.deployment, partition.date
    archive.check_date(date)
    night = nights.Night(output, deployment, date)
    mv, uri, spec = registry.resolve(deployment, options.model_alias)
    exp = registry.experiment_id(deployment)
    with registry.run(deployment, f"score-{date}") as log:
        run_id = log.id
        log.tags({"job": "score", "model_version": mv.version, "model_alias": options.model_alias,
                         "weights_kind": spec.weights_kind, "deployment": deployment, "date": date,
                         "host": socket.gethostname(), "pid": str(os.getpid())})
        if spec.is_random:
            log.tags({"warning": registry.RANDOM_WEIGHTS_BANNER})
        stale = registry.fail_dead_runs(exp, {"job": "score", "deployment": deployment, "date": date}, run_id)
        shards = artifact.plan_shards(spec, options.bank_budget_mb)
        log.params({"date": date, "archive": storage.normalize(partition.archive), "output": night.output,
                           "bank_budget_mb": options.bank_budget_mb or 0, "bank_shards": len(shards)})
        info = RunInfo(deployment=deployment, model_name=mv.name, model_version=str(mv.version), run_id=run_id)
        target = options.heatmaps(night, run_id, spec.image_size)
        use_gpu = has_gpus()
        # one scoring actor per GPU (the pool sized to the cluster, not one); on CPUs one actor, whose torch
        # threads already use the node's cores while decode tasks take the rest
        actors = options.actors_per_shard or (max(1, int(cluster_gpus())) if use_gpu else 1)
        where = decode_where(options.decode, use_gpu)
        log.params({"actors_per_shard": actors, "use_gpu": use_gpu, "decode": where,
                           "heatmap_side": target.side or "full"})
        t0 = time.time()
        nodes_at_start = alive_nodes()

        def rows(image_ids, actor_restarts):  # the whole night (None), or some of its rows again
            for ds in score_partition(partition, uri, spec, info, heatmaps=target, image_ids=image_ids,
                                      budget_mb=options.bank_budget_mb, actors_per_shard=actors,
                                      batch_size=options.batch_size, use_gpu=use_gpu, actor_restarts=actor_restarts,
                                      fault=fault, decode_on_device=where == "device",
                                      artifact_sha256=registry.artifact_sha256(mv)):
                yield from ds.map_batches(to_table, batch_format="numpy").iter_batches(batch_format="pyarrow",
                                                                                       batch_size=None)

        def crashed_row(image_id, reason):
            row = partition.read_table(archive.Rows(image_ids=(image_id,)),
                                       columns=["image_id", "product", "source_uri"]).to_pydict()
            n = len(row["image_id"])  # one row, or more where the archive repeats the image_id
            thr = [spec.products[p].threshold if p in spec.products else np.nan for p in row["product"]]
            return to_table(error_rows({k: np.array(v, dtype=object) for k, v in row.items()}, info, [reason] * n,
                                       threshold=thr))

        n_in = partition.count_rows()  # read once: progress total and the invariant
        key = resume_key(partition, mv, target, where)
        published = night.published()
        if options.skip_published and published and published.get("key") == key:
            print(f"score: the night is published by run {published['run_id']} with the same model version and "
                  f"options: nothing rescored (--skip-published)", flush=True)
            log.tags({"skipped": f"published by run {published['run_id']}"})
            return {"skipped": True, "rows_in": n_in, "rows_out": published["rows"], "run_id": run_id,
                    "published_run": published["run_id"], "model_version": mv.version, "scores_uri": published["scores"],
                    "random_weights": spec.is_random, "stale_runs_failed": stale,
                    **{k: published.get(k, 0) for k in ("ok", "error", "anomalous", "infra_errors")}}
        plan = _plan_resume(night, exp, run_id, key, options.resume)
        log.params({"resumed_from": ",".join(plan.runs) or "-", "resume_key": json.dumps(key, sort_keys=True)[:6000]})
        writer = night.writer(run_id, SCORE_SCHEMA, key, plan)
        counts = {"ok": plan.counts.get("ok", 0), "error": 0, "anomalous": plan.counts.get("anomalous", 0),
                  "infra_errors": 0}
        progress = Progress(f"score {deployment} {date}", n_in - plan.rows)
        # the rows still to score: all of them, or (resuming) those no ended run committed
        todo = None if not plan.rows else tuple(i for i in partition.image_ids() if i not in plan.image_ids)
        redone: list[int] = []  # rows run again after a node loss failed a build

        def retry_after(error: BaseException, left: int) -> bool:
            """A build failed and a node has left the cluster since the night began: its rows not yet scored run
            again on the nodes left (NODE_LOSS_RETRIES times at most); any other failure is the night's."""
            lost = set(nodes_at_start) - set(alive_nodes())
            if not lost or len(redone) >= NODE_LOSS_RETRIES:
                return False
            redone.append(left)
            print(f"score: a node left the cluster and the night's stream failed ({type(error).__name__}); "
                  f"running its {left} unscored rows again on the nodes left", flush=True)
            return True

        try:
            for table in isolating(rows, partition.image_ids, crashed_row, start=todo, retry_after=retry_after):
                writer.write(table)
                progress.update(table.num_rows)
                counts["ok"] += pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
                counts["anomalous"] += pc.sum(table["is_anomalous"]).as_py() or 0
                counts["infra_errors"] += sum(1 for e in table["error"].to_pylist() if e and e.startswith(INFRA_ERRORS))
            counts["error"] = writer.rows - counts["ok"]
            if writer.rows != n_in:  # an invariant: a bug if it breaks, never an input problem
                raise RuntimeError(f"scored {writer.rows} rows for {n_in} input rows; nothing published")
            if counts["infra_errors"] > options.max_error_rate * n_in:
                raise TooManyErrors(f"{counts['infra_errors']} of {n_in} rows failed for infrastructure reasons "
                                    f"(over --max-error-rate {options.max_error_rate:g}); nothing published, the "
                                    "previous night stands")
            progress.finish()
            # nodes that left the cluster while the night ran: Ray restarted their actors and redid their tasks
            lost = sorted(set(nodes_at_start) - set(alive_nodes()))
            if lost:
                print(f"score: {len(lost)} node(s) lost during the night ({', '.join(lost)}): their actors were "
                      f"restarted and their unfinished batches redone on the nodes left"
                      + (f", {sum(redone)} unscored rows run again after the loss failed the stream" if redone else "")
                      + "; every row is here once", flush=True)
            marker = writer.publish({"nodes_lost": lost, "rows_rerun_after_node_loss": sum(redone), "model_version": str(mv.version), "heatmaps": target.prefix,
                                     "key": key,
                                     "class_names": {p: ps.class_name for p, ps in spec.products.items() if ps.class_name},
                                     "image_score": spec.anople.get("image_score", "map"),
                                     "archive": storage.normalize(partition.archive), **counts})
        except TooManyErrors:
            writer.abort(discard=True)  # its error rows are not worth adopting; its ok rows are scored again
            raise
        except BaseException:
            writer.abort()  # killed, interrupted, a cluster fault: what it committed is adopted by a rerun
            raise
        seconds = time.time() - t0
        # the night now names this run: files of runs that ended (killed, failed, replaced) go, except the
        # heatmaps the published rows point at (adopted rows keep their own run's)
        alive = registry.running_runs(exp, {"job": "score", "deployment": deployment, "date": date})
        for other in night.runs_with_files() - alive - {run_id}:
            night.remove_run_files(other, heatmaps=other not in plan.runs)
        summary = {"rows_in": n_in, "rows_out": writer.rows, **counts, "seconds": seconds,
                   "resumed_rows": plan.rows, "resumed_from": plan.runs, "scored_rows": writer.rows - plan.rows,
                   "nodes_lost": lost, "rows_rerun_after_node_loss": sum(redone),
                   "images_per_s": n_in / seconds if seconds else 0.0, "bank_shards": len(shards),
                   "model_version": mv.version, "run_id": run_id, "scores_uri": marker["scores"],
                   "heatmaps_uri": target.prefix, "random_weights": spec.is_random, "stale_runs_failed": stale}
        summary.update(_night_drift(log, night, mv, uri))
        log.metrics({k: float(summary[k]) for k in ("rows_in", "rows_out", "ok", "error", "anomalous",
                                                           "infra_errors", "seconds", "images_per_s",
                                                           "resumed_rows", "scored_rows")})
        summary.update(_night_report(log, night))
    return summary


def resume_key(partition: archive.Partition, mv, target: HeatmapTarget, decode: str) -> dict:
    """What a run's rows depend on: a rerun adopts an ended run's rows only when all of it is the same (the model
    version and its files, the stored heatmaps' size, where JPEGs are decoded, the archive shards read)."""
    _, paths = partition.shards
    return {"model_version": str(mv.version), "artifact_sha256": registry.artifact_sha256(mv) or "",
            "heatmap_side": target.side, "decode": decode,
            "shards": hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:16]}


def _plan_resume(night: nights.Night, exp: str, run_id: str, key: dict, resume: bool) -> nights.Resume:
    """The rows this run adopts from ended runs of the night (none with resume off), said on stdout. A run
    MLflow still shows RUNNING is ended when its heartbeat is older than nights.stale_seconds() (killed on
    another host): it is marked FAILED first, so it is never adopted while it still writes."""
    others = night.runs_with_files() - {run_id}
    if not others:
        return nights.Resume()
    if not resume:
        print(f"score: --no-resume: the rows of ended run(s) {', '.join(sorted(others))} are scored again", flush=True)
        return nights.Resume()
    alive = registry.running_runs(exp, {"job": "score", "deployment": night.deployment, "date": night.date})
    ended = others - alive
    for r in others & alive:
        record = night.run_record(r)
        age = time.time() - record.get("heartbeat", 0) if record else None
        if age is not None and age > nights.stale_seconds():
            registry.fail_run(r, f"no heartbeat for {age:.0f} s (killed)")
            ended.add(r)
        elif record is not None:
            print(f"score: run {r} of this night is still running (heartbeat {age:.0f} s ago): its rows are "
                  "not adopted", flush=True)
    plan = nights.plan_resume(night, key, ended, INFRA_ERRORS)
    for r, why in sorted(plan.refused.items()):
        print(f"score: not resuming run {r}: {why}; its rows are scored again", flush=True)
    if plan.rows:
        print(f"score: resuming: {plan.rows} rows adopted from run(s) {', '.join(plan.runs)}", flush=True)
    return plan


def _night_drift(log: registry.RunLog, night: nights.Night, mv, uri: str) -> dict:
    """Test the published night's presumed-normal score distributions for drift (pipeline.nightly.drift) and log
    what was found to the run. The night is already published: a test that fails leaves it published (stderr, tag
    `drift_error`) and jobs.score exits 1."""
    try:
        files = artifact.Files(registry.materialize(uri), registry.artifact_sha256(mv))
        result = drift.assess(night, str(mv.version), files)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        print(f"WARNING: the night is published but its drift test failed ({msg})", file=sys.stderr)
        log.tags({"drift_error": msg[:5000]})
        return {"drift": None, "drift_error": msg}
    log.metrics(drift.metrics(result["products"], registry.metric_key))
    log.json(result, "drift/drift.json")
    log.tags({"drift_flagged": ",".join(result["flagged"]) or "none"}
             | ({"drift": " | ".join(result["lines"])[:5000]} if result["lines"] else {}))
    for line in result["lines"]:
        print(f"score: DRIFT {line}", flush=True)
    return {"drift": result}


def _night_report(log: registry.RunLog, night: nights.Night) -> dict:
    """Write the published night's report beside it and log it, with per-product counts, to the run. The night
    is already published: a report that fails leaves it published (stderr, tag `report_error`) and jobs.score
    exits 1 so a scheduler sees it; `jobs.report` rebuilds it."""
    try:
        version = night.published()["model_version"]
        uri, rep = report.write(night, operating_points=lineage.candidate_points(night.deployment, version),
                                lineage=lineage.lineage_of(night.deployment, version))
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        print(f"WARNING: the night is published but its report failed ({msg}); rebuild it with "
              f"python -m jobs.report --deployment {night.deployment} --date {night.date} --output {night.output}",
              file=sys.stderr)
        log.tags({"report_error": msg[:5000]})
        return {"report_uri": None, "report_error": msg}
    log.metrics({f"{k}.{registry.metric_key(p)}": float(v) for p, c in rep["products"].items()
                        for k, v in c.items()})
    log.text(storage.read_bytes(uri).decode(), "report/report.html")
    log.tags({"report": uri})
    return {"report_uri": uri, "products": rep["products"]}
