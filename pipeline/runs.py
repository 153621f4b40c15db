"""The jobs' bodies: what one training, evaluation or scoring run does end to end (Ray + MLflow glue)."""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from pipeline import registry, storage
from pipeline.artifact import ModelSpec
from pipeline.training import TrainConfig, fit_deployment


def train_and_register(cfg: TrainConfig) -> tuple[object, ModelSpec]:
    """Fit with Ray Train, log params/metrics/artifact to MLflow, register a version, alias 'candidate'."""
    mlflow = registry._mlflow()
    if not cfg.storage_path:
        cfg.storage_path = os.path.join(registry.local_root(), "ray_results")
    exp = registry.experiment_id(cfg.deployment)
    with tempfile.TemporaryDirectory() as out, mlflow.start_run(experiment_id=exp, run_name=f"train-k{cfg.shots}-s{cfg.seed}") as run:
        mlflow.log_params({"deployment": cfg.deployment, "archive": storage.normalize(cfg.archive),
                           "shots": cfg.shots, "seed": cfg.seed, "backbone": cfg.backbone, "weights": cfg.weights,
                           "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu, "blur_sigma": cfg.blur_sigma})
        t0 = time.time()
        spec, summary = fit_deployment(cfg, out)
        kind = spec.weights_kind
        mlflow.set_tags({"weights_kind": kind, "random_weights": str(spec.is_random).lower(),
                         "job": "train", "device": summary["device"], "knn_backend": summary["knn_backend"]})
        if spec.is_random:
            mlflow.set_tag("warning", registry.RANDOM_WEIGHTS_BANNER)
        mlflow.log_params({"bank_layers": ",".join(map(str, spec.bank_layers)), "image_size": spec.image_size,
                           "weights_kind": kind, "weights_fingerprint": spec.weights_fingerprint,
                           "products": ",".join(sorted(spec.products))})
        metrics = {"fit_seconds": time.time() - t0, "n_products": len(spec.products)}
        for p, ps in spec.products.items():
            key = _metric_key(p)
            metrics[f"threshold.{key}"] = ps.threshold
            metrics[f"calibration_n.{key}"] = ps.n_calibration
            mlflow.log_param(f"threshold_source.{key}", ps.calibration)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(out, artifact_path="anople")
        mv = registry.register(cfg.deployment, run.info.run_id, "anople", tags={
            "weights_kind": kind, "backbone": spec.backbone, "weights": spec.weights, "shots": str(spec.shots)})
    return mv, spec


def _metric_key(name: str) -> str:
    """MLflow metric keys allow alphanumerics, _ - . / and space; anything else becomes '_'."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)
