"""Fitting a deployment with Ray Train.

Every worker first learns the shared prompts (data-parallel over the shots, gradients averaged, a
checkpoint on storage every epoch); then worker w of W takes products[w::W] and builds their banks and
thresholds with the trained encoder on its device (a GPU per worker when the cluster has GPUs). Each
reports its files as its part of one checkpoint; Ray Train merges the parts into one folder, and the
driver turns that folder into the model artifact (`model_spec`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.exceptions import WorkerGroupError
from safetensors.torch import save as st_save

from pipeline import archive, artifact, fit_job, registry, storage
from pipeline.bank import pick_backend
from pipeline.errors import PipelineError, UsageError
from pipeline.fit_job import FitJob, TrainConfig, WorkerCrash  # defined there: Ray Train's controller unpickles them
from pipeline.fitting import fit_products, load_shots, shot_batch
from pipeline.heap import keep_large_blocks_on_heap, release_freed_memory
from pipeline.model.backbone import fingerprint, looks_untrained
from pipeline.progress import emit, epoch_line
from pipeline.prompt_training import train_prompts
from pipeline.validation import build_validation, gain, on_rank0, validate
from pipeline.weights import build_model, check_weights, weights_kind


MAX_WORKER_FAILURES = 2  # worker-group restarts (preempted or crashed workers) before the fit fails


def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def fit_worker(config: dict) -> None:
    """Ray Train per-worker loop: prompt learning (data-parallel over products), then banks and
    thresholds for this worker's products."""
    job: FitJob = config["job"]
    cfg = job.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mine = list(job.products[rank::world])
    teach = list(cfg.prompt_products or job.products)
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    keep_large_blocks_on_heap()  # the fit's forwards allocate the scoring actors' large activations (pipeline.heap)
    model = build_model(cfg.backbone, cfg.weights, cfg.seed, cfg.anople, device)
    data = load_shots(cfg.archive, cfg.deployment, sorted(set(mine) | set(teach)), cfg.shots, cfg.seed)
    epochs, val = [], None
    if cfg.anople.trains:
        seconds: list[float] = []

        def on_epoch(metrics: dict) -> None:
            release_freed_memory()
            ray.train.report(metrics)  # all ranks report each epoch (Ray Train's contract)
            if rank == 0:
                seconds.append(metrics["epoch_seconds"])
                emit(epoch_line(metrics, cfg.anople.epochs, seconds))
                metrics["mlflow_logged"] = float(_log_epoch(*job.mlflow_run, metrics))
            marker = storage.join(cfg.checkpoints(), "_injected-crash")
            if job.fault and rank == 0 and metrics["epoch"] == job.fault.after_epoch and not storage.exists(marker):
                storage.write_bytes(marker, b"crashed once")
                os._exit(70)

        # pseudo-anomalies on the teaching products' normals (pipeline.validation), validated on rank 0
        vs = build_validation(data, teach, model.image_size, cfg.anople.val_kinds, cfg.anople.val_images,
                              cfg.seed) if cfg.anople.validate and rank == 0 else None

        def check() -> dict:
            return on_rank0(lambda: validate(model, vs, device), rank, world)

        # a restarted worker group (FailureConfig) resumes from the last epoch checkpoint (--restart
        # removed the old ones before any worker started)
        epochs, val = train_prompts(model, shot_batch(data, teach, model.image_size), device,
                                    checkpoints=cfg.checkpoints(), rank=rank, world=world, on_epoch=on_epoch,
                                    validate=check if cfg.anople.validate else None)
    fits = fit_products(model, data, mine, device)
    with tempfile.TemporaryDirectory() as out:
        meta = {"fingerprint": fingerprint(model.clip), "bank_layers": list(model.bank_layers),
                "decoder_layers": list(model.decoder_layers), "prompt_depth": model.J,
                "fusion_weight": model.cfg.fusion_weight,  # resolved on the validation signal
                "image_size": model.image_size, "feature_dim": int(model.d_v), "device": device,
                "backend": pick_backend(device), "untrained_backbone": looks_untrained(model.clip)}
        _write(os.path.join(out, f"worker-{rank}.json"), json.dumps(meta))
        if cfg.anople.trains and rank == 0:
            _write(os.path.join(out, "prompts.safetensors"), st_save(model.prompt_state()))
            _write(os.path.join(out, "train_log.json"), json.dumps(epochs))
            if val is not None and val.best_epoch >= 0:
                _write(os.path.join(out, "validation.json"), json.dumps(
                    gain(val) | {"baseline": val.baseline, "stopped_early": val.stopped,
                                 "sources": vs.source if vs is not None else {}}))
        for p, fit in fits.items():
            _write(os.path.join(out, artifact.bank_file(p)), fit.bank.to_bytes())
            _write(os.path.join(out, artifact.fit_file(p)), json.dumps(
                {"product": p, "spec": dataclasses.asdict(fit.spec()), "calibration_scores": fit.calibration_scores,
                 "skipped": list(fit.skipped)}))
        ray.train.report({"products_fitted": len(mine)}, checkpoint=ray.train.Checkpoint.from_directory(out))


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
    w_rank0 = _read_json(os.path.join(out_dir, "worker-0.json")).get("fusion_weight", cfg.anople.fusion_weight)
    resolved = cfg.anople.to_dict() | {"bank_layers": w0["bank_layers"], "decoder_layers": w0["decoder_layers"],
                                        "prompt_depth": w0["prompt_depth"], "fusion_weight": w_rank0}
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
    artifact.save_spec(spec, out_dir)
    return spec, summary


def _log_epoch(tracking_uri: str, run_id: str, metrics: dict) -> bool:
    """One epoch's metrics to the training run, while it trains. False when there is no run or the tracking
    store refused (a warning: the driver logs the epoch after the fit instead)."""
    if not run_id:
        return False
    try:
        registry.log_epoch(tracking_uri, run_id, {k: v for k, v in metrics.items() if k not in ("epoch", "mlflow_logged")},
                           int(metrics["epoch"]))
        return True
    except Exception as e:
        emit(f"WARNING: epoch {metrics['epoch']} not logged to MLflow run {run_id} while training "
             f"({type(e).__name__}: {e}); it is logged after the fit")
        return False


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
    cfg = dataclasses.replace(cfg, archive=storage.normalize(cfg.archive), storage_path=storage.normalize(cfg.storage_path))
    if cfg.restart:  # start over: this run key's epoch checkpoints and Ray's run state go before any worker starts
        storage.remove_tree(storage.join(cfg.storage_path, cfg.run_key()))
    trainer = TorchTrainer(
        fit_job.fit_worker,  # a light module: see pipeline.fit_job
        # the tracking URI travels with the job: a worker's environment may not name the driver's store
        train_loop_config={"job": FitJob(cfg, tuple(products), fault,
                                         (registry.tracking_uri(), mlflow_run_id) if mlflow_run_id else ("", ""))},
        scaling_config=ScalingConfig(num_workers=max(1, cfg.num_workers), use_gpu=cfg.use_gpu),
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
