"""Fitting a deployment with Ray Train: the worker group (a GPU per worker when the cluster has GPUs), its
failure policy and checkpoints; each worker runs pipeline.fitting.worker.learn_and_fit. Ray Train merges the
workers' parts into one folder, and the driver turns that folder into the model artifact (`model_spec`).
"""
from __future__ import annotations

import dataclasses
import json
import os

from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.exceptions import WorkerGroupError

from pipeline import artifact, registry, storage
from pipeline.cluster import train_worker_cpus, worker_resources
from pipeline.errors import PipelineError, UsageError
from pipeline.fitting import job as fit_job
from pipeline.fitting.config import TrainConfig
from pipeline.fitting.job import FitJob, WorkerCrash  # defined there: Ray Train's controller unpickles them
from pipeline.fitting.weights import check_weights, weights_kind
from pipeline.sources import archive
from pipeline.sources.ingest import class_names

MAX_WORKER_FAILURES = 2  # worker-group restarts (preempted or crashed workers) before the fit fails


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def model_spec(cfg: TrainConfig, products: list[str], out_dir: str) -> tuple[artifact.ModelSpec, dict]:
    """The merged worker parts in `out_dir` -> (ModelSpec, summary: device, k-NN backend, per-product
    calibration scores, per-epoch metrics); writes model.json there."""
    workers = [_read_json(os.path.join(out_dir, f)) for f in sorted(os.listdir(out_dir)) if f.startswith("worker-")]
    if len({w["fingerprint"] for w in workers}) != 1:
        raise RuntimeError(f"workers built different backbones: {[w['fingerprint'] for w in workers]}")
    w0 = workers[0]
    # rank 0 trained (and validated): its fusion weight is the model's
    rank0 = _read_json(os.path.join(out_dir, "worker-0.json"))
    resolved = cfg.anople.to_dict() | {"bank_layers": w0["bank_layers"], "decoder_layers": w0["decoder_layers"],
                                        "prompt_depth": w0["prompt_depth"],
                                        "fusion_weight": rank0.get("fusion_weight", cfg.anople.fusion_weight),
                                        "image_score": rank0.get("image_score", cfg.anople.image_score)}
    spec = artifact.ModelSpec(
        deployment=cfg.deployment, backbone=cfg.backbone, weights=cfg.weights,
        # the weights decide, not the argument: an untrained backbone from any file or tag is "random"
        weights_kind="random" if w0["untrained_backbone"] else weights_kind(cfg.weights),
        weights_fingerprint=w0["fingerprint"], seed=cfg.seed, image_size=w0["image_size"],
        bank_layers=w0["bank_layers"], shots=cfg.shots, feature_dim=w0["feature_dim"], anople=resolved,
        prompts_file="prompts.safetensors" if cfg.anople.trains else "")
    log_path = os.path.join(out_dir, "train_log.json")
    val_path = os.path.join(out_dir, "validation.json")
    summary = {"device": w0["device"], "knn_backend": w0["backend"], "calibration": {}, "skipped": {},
               "epochs": _read_json(log_path) if os.path.exists(log_path) else [],
               "validation": _read_json(val_path) if os.path.exists(val_path) else None}
    for p in products:
        path = os.path.join(out_dir, artifact.fit_file(p))
        if not os.path.exists(path):
            raise RuntimeError(f"no worker fitted product {p!r}")
        fit = _read_json(path)
        spec.products[p] = artifact.ProductSpec(**fit["spec"])
        summary["calibration"][p] = fit["calibration_scores"]
        summary["skipped"][p] = fit.get("skipped", [])
    artifact.save_spec(spec.validate(), out_dir)  # a threshold no loader would accept fails the fit, not the night
    return spec, summary


def with_class_names(cfg: TrainConfig, products: list[str] | None = None) -> TrainConfig:
    """The config with every product's prompt words resolved (the user's, else a known dataset code's, else the
    name): they are part of the run key, so the run logs the key its fit will use. Idempotent."""
    products = products if products is not None else archive.products_in(cfg.archive, cfg.deployment)
    named = sorted(set(cfg.anople.class_names) - set(products))
    if named:
        raise UsageError(f"class names given for {named}, which have no train images in the archive "
                         f"(products: {', '.join(products)})")
    return dataclasses.replace(cfg, anople=dataclasses.replace(
        cfg.anople, class_names=class_names(products, cfg.anople.class_names)))


def fit_deployment(cfg: TrainConfig, out_dir: str, fault: WorkerCrash | None = None,
                   mlflow_run_id: str = "") -> tuple[artifact.ModelSpec, dict]:
    """Run the TorchTrainer and write the artifact to local `out_dir`. Returns (spec, summary). A worker
    that dies (a preempted node) is restarted up to MAX_WORKER_FAILURES times and resumes from the last
    epoch checkpoint. With `mlflow_run_id`, each epoch's metrics are logged to that run as it ends.
    `fault` is a test's injected worker crash."""
    check_weights(cfg.backbone, cfg.weights)
    products = archive.products_in(cfg.archive, cfg.deployment)
    unknown = sorted(set(cfg.prompt_products) - set(products))
    if unknown:
        raise UsageError(f"prompt products {unknown} have no train images in the archive")
    cfg = with_class_names(cfg, products)
    cfg = dataclasses.replace(cfg, archive=storage.normalize(cfg.archive), storage_path=storage.normalize(cfg.storage_path))
    if cfg.restart:  # start over: this run key's epoch checkpoints and Ray's run state go before any worker starts
        storage.remove_tree(storage.join(cfg.storage_path, cfg.run_key()))
    cpus = train_worker_cpus(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker)
    print(f"fit: {max(1, cfg.num_workers)} Ray Train worker(s), {cpus} CPU(s) each"
          + (" and a GPU" if cfg.use_gpu else ""), flush=True)
    trainer = TorchTrainer(
        fit_job.fit_worker,  # a light module: see pipeline.fitting.job
        # the tracking URI travels with the job: a worker's environment may not name the driver's store
        train_loop_config={"job": FitJob(cfg, tuple(products), fault,
                                         (registry.tracking_uri(), mlflow_run_id) if mlflow_run_id else ("", ""))},
        scaling_config=ScalingConfig(num_workers=max(1, cfg.num_workers), use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cpus} | ({"GPU": 1} if cfg.use_gpu else {})
                                     | worker_resources()),
        # named by the run key: a resubmitted job finds this run's Ray Train state and epoch checkpoints
        # (<storage>/<run key>/) instead of starting a stranger's
        run_config=RunConfig(name=cfg.run_key(), storage_path=cfg.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=MAX_WORKER_FAILURES),
                             # Ray Train's own INFO lines (each report, the worker group) stay in its log files
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    try:
        result = trainer.fit()
    except WorkerGroupError as e:
        # a worker's expected failure (weights that cannot be had, too few shots, ...) is the job's
        # failure as that worker worded it; anything else is a bug and keeps Ray's full report
        expected = [f for f in e.worker_failures.values() if isinstance(f, PipelineError)]
        if expected:
            raise expected[0] from e
        raise
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    result.checkpoint.to_directory(out_dir)
    return model_spec(cfg, products, out_dir)
