"""What each Ray Train worker of a fit runs (pipeline.fitting.ray_train starts them; pipeline.fitting.job's
entry imports this in the worker only): the shared prompts learned data-parallel (each step's views split over
the workers), a checkpoint on storage every epoch, then worker w of W builds the banks and thresholds of
products[w::W] with the trained encoder on its device, and reports its files as its part of one checkpoint."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import ray
import ray.train
import torch
from safetensors.torch import save as st_save

from pipeline import artifact, registry, storage
from pipeline.fitting.bank import pick_backend
from pipeline.fitting.learn import learn_and_fit_products
from pipeline.fitting.shots import load_shots
from pipeline.fitting.validation import gain
from pipeline.fitting.weights import build_model
from pipeline.heap import keep_large_blocks_on_heap, release_freed_memory
from pipeline.model.backbone import fingerprint, looks_untrained
from pipeline.progress import emit, epoch_line


def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def learn_and_fit(config: dict) -> None:
    """One Ray Train worker's fit: prompt learning (data-parallel over each step's views of the teaching shots), then the
    banks and thresholds of this worker's products, reported as its part of the run's checkpoint."""
    job = config["job"]  # a pipeline.fitting.job.FitJob
    cfg = job.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mine = list(job.products[rank::world])
    teach = list(cfg.prompt_products or job.products)
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    # torch runs on the CPUs this worker reserved (ScalingConfig's resources_per_worker, sized by
    # pipeline.cluster.train_worker_cpus), not on Ray's one-thread default
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    keep_large_blocks_on_heap()  # the fit's forwards allocate the scoring actors' large activations (pipeline.heap)
    model = build_model(cfg.backbone, cfg.weights, cfg.seed, cfg.anople, device)
    data = load_shots(cfg.archive, cfg.deployment, sorted(set(mine) | set(teach)), cfg.shots, cfg.seed)
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

    # a restarted worker group (FailureConfig) resumes from the last epoch checkpoint (--restart removed the old
    # ones before any worker started)
    learned = learn_and_fit_products(model, data, teach, mine, device, cfg.seed, rank=rank, world=world,
                                     checkpoints=cfg.checkpoints(), on_epoch=on_epoch)
    fits, epochs, val, vs = learned.fits, learned.epochs, learned.validation, learned.val_set
    with tempfile.TemporaryDirectory() as out:
        meta = {"fingerprint": fingerprint(model.clip), "bank_layers": list(model.bank_layers),
                "decoder_layers": list(model.decoder_layers), "prompt_depth": model.J,
                "fusion_weight": model.cfg.fusion_weight,  # resolved on the validation signal
                "image_score": model.cfg.image_score,      # resolved on the validation signal
                "torch_threads": torch.get_num_threads(),  # the CPUs it reserved (cluster.train_worker_cpus)
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
