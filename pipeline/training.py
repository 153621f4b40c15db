"""Fitting a deployment with Ray Train: each TorchTrainer worker fits its share of the products.

Worker w of W takes products[w::W], builds their banks and thresholds on its device (a GPU per worker
when the cluster has GPUs) and reports them as its part of one checkpoint; Ray Train merges the parts
into one folder in `storage_path`, and the driver turns that folder into the model artifact.
The prompt-learning half (next issue) trains inside the same loop.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from pipeline import archive, artifact, storage


@dataclass
class TrainConfig:
    deployment: str
    archive: str
    shots: int = 1                       # K normal shots per product (the paper: 1, 2 or 4)
    seed: int = 0
    backbone: str = "ViT-B-16-plus-240"  # open_clip architecture
    weights: str = "laion400m_e32"       # hub tag, local file, s3:// URI, or "random"
    bank_layers: tuple[int, ...] = ()    # 1-based blocks; () = PromptAD's 3 and 8 scaled to the depth
    blur_sigma: float = 4.0
    num_workers: int = 1
    use_gpu: bool = False
    storage_path: str = ""               # where Ray Train writes checkpoints (local or s3://)


def _fit_worker(cfg: dict) -> None:
    """Ray Train per-worker loop (runs in the worker process)."""
    import ray.train
    import torch

    from pipeline.bank import pick_backend
    from pipeline.fitting import choose_shots, fit_product
    from pipeline.model.backbone import PatchFeatureExtractor, default_bank_layers, fingerprint
    from pipeline.scorer import Scorer
    from pipeline.weights import load_clip

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mine = cfg["products"][rank::world]
    device = "cuda" if cfg["use_gpu"] and torch.cuda.is_available() else "cpu"
    clip = load_clip(cfg["backbone"], cfg["weights"], seed=cfg["seed"])
    depth = len(clip.visual.transformer.resblocks)
    layers = tuple(cfg["bank_layers"]) or default_bank_layers(depth)
    extractor = PatchFeatureExtractor(clip, layers).to(device)
    backend = pick_backend(device)

    def features(pixels):  # [B, 3, S, S] float32 -> per layer [B, h*w, C]
        with torch.inference_mode():
            return extractor(torch.from_numpy(pixels).to(device))

    def score_fn(bank, feats):
        return Scorer(extractor, {"_": bank}, cfg["blur_sigma"], device).score_features(feats, ["_"] * feats[0].shape[0])[0]

    with tempfile.TemporaryDirectory() as out:
        os.makedirs(os.path.join(out, "banks"), exist_ok=True)
        os.makedirs(os.path.join(out, "fits"), exist_ok=True)
        meta = {"fingerprint": fingerprint(clip), "bank_layers": list(layers), "image_size": extractor.image_size,
                "feature_dim": int(clip.visual.transformer.width), "device": device, "backend": backend}
        with open(os.path.join(out, f"worker-{rank}.json"), "w") as f:
            json.dump(meta, f)
        for product in mine:
            table = archive.read_table(cfg["archive"], cfg["deployment"], split="train", products=[product],
                                       columns=["image_id", "image", "label"])
            normal = [i for i, lab in zip(table["image_id"].to_pylist(), table["label"].to_pylist()) if lab in (0, None)]
            images = dict(zip(table["image_id"].to_pylist(), table["image"].to_pylist()))
            try:
                shots, heldout = choose_shots(normal, cfg["shots"], cfg["seed"])
                fit = fit_product(product, images, shots, heldout, features, score_fn, extractor.image_size, backend)
            except Exception as e:
                raise RuntimeError(f"product {product!r}: {e}") from e
            with open(os.path.join(out, artifact.bank_file(product)), "wb") as f:
                f.write(fit.bank.to_bytes())
            spec = artifact.ProductSpec(threshold=fit.threshold, calibration=fit.calibration,
                                        n_calibration=len(fit.calibration_scores), shots=fit.shots,
                                        n_patches=fit.bank.n_patches, bank_file=artifact.bank_file(product))
            with open(os.path.join(out, "fits", f"{quote_name(product)}.json"), "w") as f:
                json.dump({"product": product, "spec": spec.__dict__,
                           "calibration_scores": fit.calibration_scores}, f)
        ray.train.report({"products_fitted": len(mine)},
                         checkpoint=ray.train.Checkpoint.from_directory(out))


def quote_name(product: str) -> str:
    from urllib.parse import quote
    return quote(product, safe="")


def products_in(archive_uri: str, deployment: str) -> list[str]:
    table = archive.read_table(archive_uri, deployment, split="train", columns=["product"])
    products = sorted(set(table["product"].to_pylist()))
    if not products:
        raise ValueError(f"deployment {deployment!r} has no train-split images in {archive_uri}")
    return products


def fit_deployment(cfg: TrainConfig, out_dir: str) -> tuple[artifact.ModelSpec, dict]:
    """Run the TorchTrainer and write the artifact to local `out_dir`. Returns (spec, summary metrics)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.weights import weights_kind

    products = products_in(cfg.archive, cfg.deployment)
    loop_cfg = {"products": products, "archive": storage.normalize(cfg.archive), "deployment": cfg.deployment,
                "shots": cfg.shots, "seed": cfg.seed, "backbone": cfg.backbone, "weights": cfg.weights,
                "bank_layers": list(cfg.bank_layers), "blur_sigma": cfg.blur_sigma, "use_gpu": cfg.use_gpu}
    trainer = TorchTrainer(
        _fit_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=max(1, cfg.num_workers), use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=f"anople-{cfg.deployment}-{os.getpid()}-{np.random.randint(1 << 30)}",
                             storage_path=storage.normalize(cfg.storage_path),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors (WorkerGroupError, TrainingFailedError, ...)
        raise RuntimeError(f"training failed: {e}") from e
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    result.checkpoint.to_directory(out_dir)

    workers = [json.load(open(os.path.join(out_dir, f))) for f in sorted(os.listdir(out_dir)) if f.startswith("worker-")]
    if len({w["fingerprint"] for w in workers}) != 1:
        raise RuntimeError(f"workers built different backbones: {[w['fingerprint'] for w in workers]}")
    w0 = workers[0]
    spec = artifact.ModelSpec(
        deployment=cfg.deployment, backbone=cfg.backbone, weights=cfg.weights, weights_kind=weights_kind(cfg.weights),
        weights_fingerprint=w0["fingerprint"], seed=cfg.seed, image_size=w0["image_size"],
        bank_layers=w0["bank_layers"], shots=cfg.shots, feature_dim=w0["feature_dim"], blur_sigma=cfg.blur_sigma)
    summary = {"device": w0["device"], "knn_backend": w0["backend"], "calibration": {}}
    for p in products:
        path = os.path.join(out_dir, "fits", f"{quote_name(p)}.json")
        if not os.path.exists(path):
            raise RuntimeError(f"no worker fitted product {p!r}")
        fit = json.load(open(path))
        spec.products[p] = artifact.ProductSpec(**fit["spec"])
        summary["calibration"][p] = fit["calibration_scores"]
    artifact.save_spec(spec, out_dir)
    return spec, summary
