"""Training a deployment, top to bottom: fit with Ray Train (pipeline.fitting.ray_train), log the run to MLflow (params,
per-epoch metrics, validation, thresholds), log the artifact as an MLflow model and register a version with
the alias `candidate`."""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time

from pipeline import artifact, registry, serving, storage
from pipeline.fitting.config import TrainConfig
from pipeline.fitting.ray_train import fit_deployment, with_class_names
from pipeline.fitting.validation import verdict


def with_storage(cfg: TrainConfig) -> TrainConfig:
    """The config with Ray Train storage resolved (default <ANOPLE_ROOT>/ray_results); the caller's is untouched."""
    return cfg if cfg.storage_path else dataclasses.replace(
        cfg, storage_path=os.path.join(registry.local_root(), "ray_results"))


def train_and_register(cfg: TrainConfig) -> tuple[object, artifact.ModelSpec, dict]:
    """Fit with Ray Train, log params/metrics/artifact to MLflow, register a version, alias 'candidate'.
    Returns (model version, spec, fit summary: device, k-NN backend, per-epoch metrics)."""
    cfg = with_class_names(with_storage(cfg))
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
        log.params({"resolved.image_score": spec.anople["image_score"]}
                   | {f"class_name.{registry.metric_key(p)}": ps.class_name for p, ps in spec.products.items()})
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
        digest = artifact.write_manifest(out)  # every loader checks its files against it, and it against the version
        log.tags({"artifact_sha256": digest})
        logged = serving.log_model(out, digest)  # an MLflow pyfunc model holding the artifact (pipeline.serving)
        mv = registry.register(cfg.deployment, log.id, logged.model_id, tags={
            "weights_kind": kind, "backbone": spec.backbone, "weights": spec.weights, "shots": str(spec.shots),
            "artifact_sha256": digest})
    return mv, spec, summary
