"""The jobs' bodies: what one training or evaluation run does end to end (Ray + MLflow glue); a night's
scoring is pipeline.nightly."""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np

from pipeline import archive, artifact, evidence, registry, serving, storage
from pipeline.batch import score_partition
from pipeline.cluster import has_gpus
from pipeline.errors import PipelineError, UsageError
from pipeline.metrics import PAPER_METRICS, ProductMetrics, summarize
from pipeline.score_table import RunInfo
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
    with tempfile.TemporaryDirectory() as out, registry.run(cfg.deployment, f"train-k{cfg.shots}-s{cfg.seed}") as log:
        log.params({"deployment": cfg.deployment, "archive": storage.normalize(cfg.archive),
                           "shots": cfg.shots, "seed": cfg.seed, "backbone": cfg.backbone, "weights": cfg.weights,
                           "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu, "run_key": cfg.run_key()})
        log.params(registry.config_params(cfg.anople))
        t0 = time.time()
        spec, summary = fit_deployment(cfg, out, mlflow_run_id=log.id)
        kind = spec.weights_kind
        log.tags({"weights_kind": kind, "random_weights": str(spec.is_random).lower(),
                         "job": "train", "device": summary["device"], "knn_backend": summary["knn_backend"]})
        if spec.is_random:
            log.tags({"warning": registry.RANDOM_WEIGHTS_BANNER})
        log.params({"bank_layers": ",".join(map(str, spec.bank_layers)), "image_size": spec.image_size,
                           "weights_kind": kind, "weights_fingerprint": spec.weights_fingerprint,
                           "products": ",".join(sorted(spec.products))})
        for e in summary["epochs"]:  # the epochs the worker could not log as they ended (losses, validation curve)
            if not e.get("mlflow_logged"):
                log.metrics({k: v for k, v in e.items() if k not in ("epoch", "mlflow_logged")},
                                   step=int(e["epoch"]))
        if summary["validation"]:
            v = summary["validation"]
            log.metrics({k: v[k] for k in ("val_gain_pixel_auroc", "val_best_fused_pixel_auroc",
                                                  "val_bank_pixel_auroc_untrained", "val_best_epoch")})
            log.json(v, "validation.json")
            line, warning = verdict(v)
            log.tags({"validation": line})
            if warning:
                log.tags({"validation_warning": warning})
        log.params({"resolved.bank_layers": ",".join(map(str, spec.anople["bank_layers"])),
                           "resolved.decoder_layers": ",".join(map(str, spec.anople["decoder_layers"])),
                           "resolved.prompt_depth": spec.anople["prompt_depth"]})
        metrics = {"fit_seconds": time.time() - t0, "n_products": len(spec.products)}
        for p, ps in spec.products.items():
            key = registry.metric_key(p)
            metrics[f"threshold.{key}"] = ps.threshold
            metrics[f"calibration_n.{key}"] = ps.n_calibration
            metrics[f"skipped_undecodable.{key}"] = len(summary["skipped"].get(p, []))
            log.params({f"threshold_source.{key}": ps.calibration})
        log.metrics(metrics)
        if any(summary["skipped"].values()):
            log.json(summary["skipped"], "skipped_undecodable.json")
        logged = serving.log_model(out)  # an MLflow pyfunc model holding the artifact (pipeline.serving)
        mv = registry.register(cfg.deployment, log.id, logged.model_id, tags={
            "weights_kind": kind, "backbone": spec.backbone, "weights": spec.weights, "shots": str(spec.shots)})
    return mv, spec, summary


def evaluate(deployment: str, archive_uri: str, alias: str = "candidate", batch_size: int = 16) -> dict:
    """Score the labelled test split, stream the metrics, log them to the version's run. Returns
    {"per_product": {...}, "mean": {...}, "errors": n, "model_version": v}."""
    mv, uri, spec = registry.resolve(deployment, alias)
    info = RunInfo(deployment=deployment, model_name=mv.name, model_version=str(mv.version), run_id=mv.run_id or "")
    examples = evidence.Examples()
    per, errors, unlabelled = _stream_metrics(archive_uri, deployment, uri, spec, info, None, batch_size, examples)
    if not per:
        raise UsageError(f"no labelled, scorable test images for deployment {deployment!r} in {archive_uri}")
    results = {p: m.compute() for p, m in sorted(per.items())}
    mean = summarize(results)
    with registry.run(run_id=mv.run_id) as log:
        flat = {f"eval.{k}.{registry.metric_key(p)}": v for p, r in results.items() for k, v in r.items() if np.isfinite(v)}
        flat.update({f"eval.{k}.mean": v for k, v in mean.items() if np.isfinite(v)})
        flat["eval.errors"] = len(errors)
        log.metrics(flat)
        log.json({"per_product": results, "mean": mean, "errors": errors}, "evaluation.json")
        ids = [e[1] for e in examples.best.values()]
        images = archive.read_images(archive_uri, deployment, None, ids) if ids else {}
        evidence.log_evaluation(log, per, results, examples, images,
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
    parts = score_partition(archive.Partition(archive_uri, deployment), uri, spec, info, split="test", with_masks=True,
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
    products = archive.products_in(base.archive, base.deployment)
    if setting == "unseen" and len(products) < 2:
        raise UsageError("leave-one-product-out needs at least two products")
    table: dict = {}
    with registry.run(base.deployment, f"protocol-{setting}") as log:
        log.tags({"job": "evaluate-protocol", "setting": setting})
        log.params({"shots": ",".join(map(str, shots_list)), "seeds": ",".join(map(str, seeds)),
                           "backbone": base.backbone, "weights": base.weights})
        log.params(registry.config_params(base.anople))
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
                                   model_version=cfg.run_key(), run_id=log.id)
                    per, _, _ = _stream_metrics(base.archive, base.deployment, uri, spec, info, only, batch_size)
                    for p, r in ((p, m.compute()) for p, m in per.items()):
                        for m in PAPER_METRICS:
                            table.setdefault(k, {}).setdefault(p, {}).setdefault(m, []).append(r[m])
            for m in PAPER_METRICS:
                for p, r in table[k].items():
                    log.metrics({f"k{k}.{m}.{registry.metric_key(p)}": float(np.mean(r[m]))})
                log.metrics({f"k{k}.{m}.mean": float(np.mean([np.mean(r[m]) for r in table[k].values()]))})
        log.json({str(k): v for k, v in table.items()}, "protocol.json")
    return table
