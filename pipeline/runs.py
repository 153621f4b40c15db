"""The jobs' bodies: what one training, evaluation or scoring run does end to end (Ray + MLflow glue)."""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import tempfile
import time

import numpy as np
import pyarrow.compute as pc

from pipeline import archive, artifact, evidence, nights, registry, report, serving, storage
from pipeline.batch import INFRA_ERRORS, InjectedFault, HeatmapTarget, isolating, score_partition
from pipeline.cluster import cluster_gpus, has_gpus
from pipeline.decoding import decode_where
from pipeline.errors import PipelineError, UsageError
from pipeline.metrics import PAPER_METRICS, ProductMetrics, summarize
from pipeline.progress import Progress
from pipeline.score_table import SCORE_SCHEMA, RunInfo, error_rows, to_table
from pipeline.training import TrainConfig, fit_deployment
from pipeline.validation import verdict


class EvaluationIncomplete(PipelineError):
    """Some labelled test rows (image or mask) could not be scored; the metrics leave them out."""


def _with_storage(cfg: TrainConfig) -> TrainConfig:
    """The config with Ray Train storage resolved (default <ANOPLE_ROOT>/ray_results); the caller's is untouched."""
    return cfg if cfg.storage_path else dataclasses.replace(
        cfg, storage_path=os.path.join(registry.local_root(), "ray_results"))


def train_and_register(cfg: TrainConfig) -> tuple[object, artifact.ModelSpec, dict]:
    """Fit with Ray Train, log params/metrics/artifact to MLflow, register a version, alias 'candidate'.
    Returns (model version, spec, fit summary: device, k-NN backend, per-epoch metrics)."""
    cfg = _with_storage(cfg)
    mlflow = registry.connect()
    exp = registry.experiment_id(cfg.deployment)
    with tempfile.TemporaryDirectory() as out, mlflow.start_run(experiment_id=exp, run_name=f"train-k{cfg.shots}-s{cfg.seed}") as run:
        mlflow.log_params({"deployment": cfg.deployment, "archive": storage.normalize(cfg.archive),
                           "shots": cfg.shots, "seed": cfg.seed, "backbone": cfg.backbone, "weights": cfg.weights,
                           "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu, "run_key": cfg.run_key()})
        mlflow.log_params(registry.config_params(cfg.anople))
        t0 = time.time()
        spec, summary = fit_deployment(cfg, out, mlflow_run_id=run.info.run_id)
        kind = spec.weights_kind
        mlflow.set_tags({"weights_kind": kind, "random_weights": str(spec.is_random).lower(),
                         "job": "train", "device": summary["device"], "knn_backend": summary["knn_backend"]})
        if spec.is_random:
            mlflow.set_tag("warning", registry.RANDOM_WEIGHTS_BANNER)
        mlflow.log_params({"bank_layers": ",".join(map(str, spec.bank_layers)), "image_size": spec.image_size,
                           "weights_kind": kind, "weights_fingerprint": spec.weights_fingerprint,
                           "products": ",".join(sorted(spec.products))})
        for e in summary["epochs"]:  # the epochs the worker could not log as they ended (losses, validation curve)
            if not e.get("mlflow_logged"):
                mlflow.log_metrics({k: v for k, v in e.items() if k not in ("epoch", "mlflow_logged")},
                                   step=int(e["epoch"]))
        if summary["validation"]:
            v = summary["validation"]
            mlflow.log_metrics({k: v[k] for k in ("val_gain_pixel_auroc", "val_best_fused_pixel_auroc",
                                                  "val_bank_pixel_auroc_untrained", "val_best_epoch")})
            mlflow.log_dict(v, "validation.json")
            line, warning = verdict(v)
            mlflow.set_tag("validation", line)
            if warning:
                mlflow.set_tag("validation_warning", warning)
        mlflow.log_params({"resolved.bank_layers": ",".join(map(str, spec.anople["bank_layers"])),
                           "resolved.decoder_layers": ",".join(map(str, spec.anople["decoder_layers"])),
                           "resolved.prompt_depth": spec.anople["prompt_depth"]})
        metrics = {"fit_seconds": time.time() - t0, "n_products": len(spec.products)}
        for p, ps in spec.products.items():
            key = _metric_key(p)
            metrics[f"threshold.{key}"] = ps.threshold
            metrics[f"calibration_n.{key}"] = ps.n_calibration
            metrics[f"skipped_undecodable.{key}"] = len(summary["skipped"].get(p, []))
            mlflow.log_param(f"threshold_source.{key}", ps.calibration)
        mlflow.log_metrics(metrics)
        if any(summary["skipped"].values()):
            mlflow.log_dict(summary["skipped"], "skipped_undecodable.json")
        logged = serving.log_model(out)  # an MLflow pyfunc model holding the artifact (pipeline.serving)
        mv = registry.register(cfg.deployment, run.info.run_id, logged.model_id, tags={
            "weights_kind": kind, "backbone": spec.backbone, "weights": spec.weights, "shots": str(spec.shots)})
    return mv, spec, summary


def _metric_key(name: str) -> str:
    """MLflow metric keys allow alphanumerics, _ - . / and space; anything else becomes '_'."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _resolve(deployment: str, alias: str):
    """(version, its model source for the actors, its spec): actors fetch the source on their own node."""
    mv = registry.get_version(deployment, alias=alias)
    uri = registry.model_source(mv)
    return mv, uri, artifact.load_spec(registry.materialize(uri))


class TooManyErrors(PipelineError):
    """More rows failed for infrastructure reasons than the night may lose; nothing was published."""


def score_night(deployment: str, archive_uri: str, date: str, output: str, alias: str = "production",
                budget_mb: float | None = None, actors_per_shard: int | None = None, batch_size: int = 16,
                max_error_rate: float = 0.05, fault: InjectedFault | None = None, heatmap_side: int | None = None,
                heatmap_full_res: bool = False, decode: str = "auto") -> dict:
    """Score one night's partition and publish its score rows and heatmaps under `output` atomically
    (pipeline.nights): a run that fails or is killed leaves the previous night as it was. A row that kills
    its scoring process again and again is isolated into an error row (batch.isolating). More than
    `max_error_rate` of rows failing for infrastructure reasons fails the run: nothing is published.
    Heatmaps are stored with the long side at most `heatmap_side` (default: the model's input size, what
    the map carries) or, with `heatmap_full_res`, at each image's own resolution. `decode`: where JPEGs are
    decoded, "cpu" (Ray's CPU tasks), "device" (the scoring actors, nvJPEG on a GPU: device_decode) or "auto"
    (device where the actors hold GPUs, else cpu: decoding.decode_where). `fault`
    is a test's injected crash. Returns a summary."""
    archive.check_date(date)
    decode_where(decode, False)  # a wrong value fails before any run starts
    mlflow = registry.connect()
    mv, uri, spec = _resolve(deployment, alias)
    output = storage.normalize(output)
    exp = registry.experiment_id(deployment)
    with mlflow.start_run(experiment_id=exp, run_name=f"score-{date}") as run:
        run_id = run.info.run_id
        mlflow.set_tags({"job": "score", "model_version": mv.version, "model_alias": alias,
                         "weights_kind": spec.weights_kind, "deployment": deployment, "date": date,
                         "host": socket.gethostname(), "pid": str(os.getpid())})
        if spec.is_random:
            mlflow.set_tag("warning", registry.RANDOM_WEIGHTS_BANNER)
        stale = registry.fail_dead_runs(exp, {"job": "score", "deployment": deployment, "date": date}, run_id)
        shards = artifact.plan_shards(spec, budget_mb)
        mlflow.log_params({"date": date, "archive": storage.normalize(archive_uri), "output": output,
                           "bank_budget_mb": budget_mb or 0, "bank_shards": len(shards)})
        info = RunInfo(deployment=deployment, model_name=mv.name, model_version=str(mv.version), run_id=run_id)
        heatmaps = nights.heatmap_prefix(output, deployment, date, run_id)
        target = HeatmapTarget(heatmaps, None if heatmap_full_res else heatmap_side or spec.image_size)
        use_gpu = has_gpus()
        # one scoring actor per GPU (the pool sized to the cluster, not one); on CPUs one actor, whose torch
        # threads already use the node's cores while decode tasks take the rest
        actors = actors_per_shard or (max(1, int(cluster_gpus())) if use_gpu else 1)
        where = decode_where(decode, use_gpu)
        mlflow.log_params({"actors_per_shard": actors, "use_gpu": use_gpu, "decode": where})
        mlflow.log_params({"heatmap_side": target.side or "full"})
        t0 = time.time()

        def night(image_ids, actor_restarts):  # the whole night (None), or some of its rows again
            for ds in score_partition(archive_uri, deployment, date, uri, spec, info, heatmaps=target,
                                      image_ids=image_ids, budget_mb=budget_mb, actors_per_shard=actors,
                                      batch_size=batch_size, use_gpu=use_gpu, actor_restarts=actor_restarts,
                                      fault=fault, decode_on_device=where == "device"):
                yield from ds.map_batches(to_table, batch_format="numpy").iter_batches(batch_format="pyarrow",
                                                                                       batch_size=None)

        def crashed_row(image_id, reason):
            row = archive.read_table(archive_uri, deployment, date, archive.Rows(image_ids=(image_id,)),
                                     columns=["image_id", "product", "source_uri"]).to_pydict()
            n = len(row["image_id"])  # one row, or more where the archive repeats the image_id
            thr = [spec.products[p].threshold if p in spec.products else np.nan for p in row["product"]]
            return to_table(error_rows({k: np.array(v, dtype=object) for k, v in row.items()}, info, [reason] * n,
                                       threshold=thr))

        def all_ids():
            return archive.read_table(archive_uri, deployment, date, columns=["image_id"])["image_id"].to_pylist()

        writer = nights.NightWriter(output, deployment, date, run_id, SCORE_SCHEMA)
        counts = {"ok": 0, "error": 0, "anomalous": 0, "infra_errors": 0}
        n_in = archive.count_rows(archive_uri, deployment, date)  # read once: progress total and the invariant
        progress = Progress(f"score {deployment} {date}", n_in)
        try:
            for table in isolating(night, all_ids, crashed_row):
                writer.write(table)
                progress.update(table.num_rows)
                counts["ok"] += pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
                counts["anomalous"] += pc.sum(table["is_anomalous"]).as_py() or 0
                counts["infra_errors"] += sum(1 for e in table["error"].to_pylist() if e and e.startswith(INFRA_ERRORS))
            counts["error"] = writer.rows - counts["ok"]
            if writer.rows != n_in:  # an invariant: a bug if it breaks, never an input problem
                raise RuntimeError(f"scored {writer.rows} rows for {n_in} input rows; nothing published")
            if counts["infra_errors"] > max_error_rate * n_in:
                raise TooManyErrors(f"{counts['infra_errors']} of {n_in} rows failed for infrastructure reasons "
                                    f"(over --max-error-rate {max_error_rate:g}); nothing published, the previous "
                                    "night stands")
            progress.finish()
            marker = writer.publish({"model_version": str(mv.version), "heatmaps": heatmaps,
                                     "archive": storage.normalize(archive_uri), **counts})
        except BaseException:
            writer.abort()
            raise
        seconds = time.time() - t0
        # the night now names this run: files of runs that ended (killed, failed, replaced) go
        alive = registry.running_runs(exp, {"job": "score", "deployment": deployment, "date": date})
        for other in nights.runs_with_files(output, deployment, date) - alive - {run_id}:
            nights.remove_run_files(output, deployment, date, other)
        summary = {"rows_in": n_in, "rows_out": writer.rows, **counts, "seconds": seconds,
                   "images_per_s": n_in / seconds if seconds else 0.0, "bank_shards": len(shards),
                   "model_version": mv.version, "run_id": run_id, "scores_uri": marker["scores"],
                   "heatmaps_uri": heatmaps, "random_weights": spec.is_random, "stale_runs_failed": stale}
        mlflow.log_metrics({k: float(summary[k]) for k in ("rows_in", "rows_out", "ok", "error", "anomalous",
                                                           "infra_errors", "seconds", "images_per_s")})
        summary.update(_night_report(mlflow, output, deployment, date))
    return summary


def _night_report(mlflow, output: str, deployment: str, date: str) -> dict:
    """Write the published night's report beside it and log it, with per-product counts, to the run. The night
    is already published: a report that fails is a warning (stderr, tag `report_error`), not a failed night;
    `jobs.report` rebuilds it."""
    try:
        uri, rep = report.write(output, deployment, date)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        print(f"WARNING: the night is published but its report failed ({msg}); rebuild it with "
              f"python -m jobs.report --deployment {deployment} --date {date} --output {output}", file=sys.stderr)
        mlflow.set_tag("report_error", msg[:5000])
        return {"report_uri": None, "report_error": msg}
    mlflow.log_metrics({f"{k}.{_metric_key(p)}": float(v) for p, c in rep["products"].items() for k, v in c.items()})
    mlflow.log_text(storage.read_bytes(uri).decode(), "report/report.html")
    mlflow.set_tag("report", uri)
    return {"report_uri": uri, "products": rep["products"]}


def evaluate(deployment: str, archive_uri: str, alias: str = "candidate", batch_size: int = 16) -> dict:
    """Score the labelled test split, stream the metrics, log them to the version's run. Returns
    {"per_product": {...}, "mean": {...}, "errors": n, "model_version": v}."""
    mv, uri, spec = _resolve(deployment, alias)
    info = RunInfo(deployment=deployment, model_name=mv.name, model_version=str(mv.version), run_id=mv.run_id or "")
    examples = evidence.Examples()
    per, errors, unlabelled = _stream_metrics(archive_uri, deployment, uri, spec, info, None, batch_size, examples)
    if not per:
        raise UsageError(f"no labelled, scorable test images for deployment {deployment!r} in {archive_uri}")
    results = {p: m.compute() for p, m in sorted(per.items())}
    mean = summarize(results)
    mlflow = registry.connect()
    with mlflow.start_run(run_id=mv.run_id):
        flat = {f"eval.{k}.{_metric_key(p)}": v for p, r in results.items() for k, v in r.items() if np.isfinite(v)}
        flat.update({f"eval.{k}.mean": v for k, v in mean.items() if np.isfinite(v)})
        flat["eval.errors"] = len(errors)
        mlflow.log_metrics(flat)
        mlflow.log_dict({"per_product": results, "mean": mean, "errors": errors}, "evaluation.json")
        ids = [e[1] for e in examples.best.values()]
        images = archive.read_images(archive_uri, deployment, None, ids) if ids else {}
        evidence.log_evaluation(mlflow, per, results, examples, images,
                                {p: ps.threshold for p, ps in spec.products.items()}, str(mv.version))
    if errors:  # an evaluation that could not use every labelled image is not one the gate accepts
        raise EvaluationIncomplete(
            f"{len(errors)} labelled test image(s) or mask(s) could not be used, so version {mv.version} is not "
            "marked evaluated:\n  " + "\n  ".join(errors[:20]) + ("\n  ..." if len(errors) > 20 else ""))
    registry.record_evaluation(mv, mean, len(errors))
    clipped = sum(m.pixel.clipped for m in per.values())
    return {"per_product": results, "mean": mean, "errors": errors, "unlabelled": unlabelled,
            "model_version": mv.version, "random_weights": spec.is_random, "clipped_pixels": clipped}


def _stream_metrics(archive_uri: str, deployment: str, uri: str, spec: artifact.ModelSpec, info: RunInfo,
                    only: list[str] | None, batch_size: int, examples: evidence.Examples | None = None):
    """Score the labelled test split through Ray Data and fold each image into its product's streaming
    metrics (and offer it to `examples`). Returns ({product: ProductMetrics}, error lines of labelled rows, count
    of unlabelled rows)."""
    parts = score_partition(archive_uri, deployment, None, uri, spec, info, split="test", with_masks=True,
                            only=only, batch_size=batch_size, use_gpu=has_gpus())
    per: dict[str, ProductMetrics] = {}
    errors, unlabelled = [], 0
    for ds in parts:
        for b in ds.iter_batches(batch_format="numpy", batch_size=batch_size):
            for i in range(len(b["image_id"])):
                if b["label"][i] < 0:  # nightly rows carry no label: not part of the evaluation
                    unlabelled += 1
                elif b["status"][i] != "ok":
                    errors.append(f"{b['image_id'][i]}: {b['error'][i]}")
                else:
                    per.setdefault(str(b["product"][i]), ProductMetrics()).update(
                        b["score"][i], int(b["label"][i]), b["map"][i], b["mask"][i])
                    if examples is not None:
                        examples.offer(str(b["product"][i]), int(b["label"][i]), float(b["score"][i]),
                                       str(b["image_id"][i]), b["map"][i], b["mask"][i])
    return per, errors, unlabelled


def evaluate_protocol(base: TrainConfig, shots_list: list[int], seeds: list[int], setting: str = "multi-class",
                      batch_size: int = 16) -> dict:
    """The paper's protocol: for each k and seed, fit (multi-class: one model on every product;
    unseen: per product, prompts trained on all the others) and evaluate on the test split.
    Returns {k: {product: {metric: [value per seed]}}} and logs it to MLflow."""
    if setting not in ("multi-class", "unseen"):
        raise UsageError(f"setting {setting!r} is 'multi-class' or 'unseen'")
    base = _with_storage(base)
    mlflow = registry.connect()
    products = archive.products_in(base.archive, base.deployment)
    if setting == "unseen" and len(products) < 2:
        raise UsageError("leave-one-product-out needs at least two products")
    table: dict = {}
    with mlflow.start_run(experiment_id=registry.experiment_id(base.deployment), run_name=f"protocol-{setting}") as run:
        mlflow.set_tags({"job": "evaluate-protocol", "setting": setting})
        mlflow.log_params({"shots": ",".join(map(str, shots_list)), "seeds": ",".join(map(str, seeds)),
                           "backbone": base.backbone, "weights": base.weights})
        mlflow.log_params(registry.config_params(base.anople))
        for k in shots_list:
            for seed in seeds:
                groups = [(None, ())] if setting == "multi-class" else [
                    ([p], tuple(q for q in products if q != p)) for p in products]
                for only, teach in groups:
                    cfg = dataclasses.replace(base, shots=k, seed=seed, prompt_products=teach,
                                              anople=dataclasses.replace(base.anople, seed=seed))
                    with tempfile.TemporaryDirectory() as out:
                        spec, _ = fit_deployment(cfg, out)
                        uri = storage.join(storage.normalize(cfg.storage_path), cfg.run_key(), "artifact")
                        storage.remove_tree(uri)
                        storage.upload_tree(out, uri)  # where every actor can read it
                    # a protocol model is never registered: it is named by its run key
                    info = RunInfo(deployment=base.deployment, model_name=f"{registry.model_name(base.deployment)}-protocol",
                                   model_version=cfg.run_key(), run_id=run.info.run_id)
                    per, _, _ = _stream_metrics(base.archive, base.deployment, uri, spec, info, only, batch_size)
                    for p, r in ((p, m.compute()) for p, m in per.items()):
                        for m in PAPER_METRICS:
                            table.setdefault(k, {}).setdefault(p, {}).setdefault(m, []).append(r[m])
            for m in PAPER_METRICS:
                for p, r in table[k].items():
                    mlflow.log_metric(f"k{k}.{m}.{_metric_key(p)}", float(np.mean(r[m])))
                mlflow.log_metric(f"k{k}.{m}.mean", float(np.mean([np.mean(r[m]) for r in table[k].values()])))
        mlflow.log_dict({str(k): v for k, v in table.items()}, "protocol.json")
    return table
