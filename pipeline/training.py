"""Fitting a deployment with Ray Train.

Every worker first learns the shared prompts (data-parallel over the shots, gradients averaged, a
checkpoint on storage every epoch); then worker w of W takes products[w::W] and builds their banks and
thresholds with the trained encoder on its device (a GPU per worker when the cluster has GPUs). Each
reports its files as its part of one checkpoint; Ray Train merges the parts into one folder, and the
driver turns that folder into the model artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline import archive, artifact, storage
from pipeline.model.config import AnoPLeConfig


@dataclass
class TrainConfig:
    deployment: str
    archive: str
    shots: int = 1                       # K normal shots per product (the paper: 1, 2 or 4)
    seed: int = 0
    backbone: str = "ViT-B-16-plus-240"  # open_clip architecture
    weights: str = "laion400m_e32"       # hub tag, local file, s3:// URI, or "random"
    anople: AnoPLeConfig = field(default_factory=AnoPLeConfig)
    num_workers: int = 1
    use_gpu: bool = False
    storage_path: str = ""               # Ray Train storage and prompt checkpoints (local or s3://)
    restart: bool = False                # ignore earlier epoch checkpoints of the same run key
    prompt_products: tuple[str, ...] = ()  # products whose shots train the prompts; () = all
                                           # (leave-one-product-out: all but the unseen one)

    def run_key(self) -> str:
        """Same data, shots, seed, backbone and config -> same key: a rerun resumes that run."""
        blob = json.dumps([self.deployment, storage.normalize(self.archive), self.shots, self.seed, self.backbone,
                           self.weights, self.anople.to_dict(), sorted(self.prompt_products)], sort_keys=True)
        return f"anople-{self.deployment}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _load_shots(cfg: dict, products: list[str]) -> dict[str, tuple[dict, list[str], list[str]]]:
    """Per product: (its train images by id, the chosen shot ids, the held-out normal ids)."""
    from pipeline.fitting import choose_shots

    table = archive.read_table(cfg["archive"], cfg["deployment"], split="train", products=products,
                               columns=["image_id", "product", "image", "label"])
    rows: dict[str, list] = {p: [] for p in products}
    for r in table.to_pylist():
        rows[r["product"]].append(r)
    data = {}
    for product, rs in rows.items():
        normal = [r["image_id"] for r in rs if r["label"] in (0, None)]
        try:
            shots, heldout = choose_shots(normal, cfg["shots"], cfg["seed"])
        except ValueError as e:
            raise RuntimeError(f"product {product!r}: {e}") from e
        data[product] = ({r["image_id"]: r["image"] for r in rs}, shots, heldout)
    return data


def _fit_worker(cfg: dict) -> None:
    """Ray Train per-worker loop: prompt learning (data-parallel over products), then banks and
    thresholds for this worker's products."""
    import ray.train
    import torch
    from safetensors.torch import save as st_save

    from pipeline.bank import pick_backend
    from pipeline.fitting import fit_product
    from pipeline.images import decode_image, to_model_input
    from pipeline.model.backbone import fingerprint
    from pipeline.prompt_training import PromptTrainer, ShotBatch, all_reduce_grads, shots_batch
    from pipeline.scorer import Scorer, build_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mine = cfg["products"][rank::world]
    device = "cuda" if cfg["use_gpu"] and torch.cuda.is_available() else "cpu"
    acfg = AnoPLeConfig.from_dict(cfg["anople"])
    model = build_model(cfg["backbone"], cfg["weights"], cfg["seed"], acfg, device)
    teach = cfg["prompt_products"] or cfg["products"]
    data = _load_shots(cfg, sorted(set(mine) | set(teach)))

    epoch_log = []
    if acfg.trains:
        pix = {p: [to_model_input(decode_image(data[p][0][i]), model.image_size) for i in data[p][1]] for p in teach}
        batch = shots_batch(pix, teach)
        if world > 1:  # data-parallel: each worker takes every world-th shot, gradients are averaged
            if len(batch.pixels) < world:
                raise RuntimeError(f"{len(batch.pixels)} training shots cannot feed {world} workers")
            batch = ShotBatch(batch.pixels[rank::world], batch.product_index[rank::world], batch.products)
        trainer = PromptTrainer(model, batch, device,
                                grad_sync=all_reduce_grads if world > 1 else None, amp=device == "cuda")
        ckpts = storage.join(cfg["storage_path"], cfg["run_key"], "prompt-checkpoints")
        latest = None if cfg["restart"] else _latest_checkpoint(ckpts)
        if latest:
            trainer.load_state_bytes(storage.read_bytes(latest))
        while trainer.epoch < acfg.epochs:
            t0 = time.time()
            metrics = trainer.run_epoch()
            metrics["epoch_seconds"] = time.time() - t0
            epoch_log.append(metrics)
            if rank == 0:  # every epoch: resumable from storage
                storage.write_bytes(storage.join(ckpts, f"epoch-{trainer.epoch:04d}.pt"), trainer.state_bytes())
            ray.train.report(metrics)  # all ranks report each epoch (Ray Train's contract)

    with tempfile.TemporaryDirectory() as out:
        os.makedirs(os.path.join(out, "banks"), exist_ok=True)
        os.makedirs(os.path.join(out, "fits"), exist_ok=True)
        meta = {"fingerprint": fingerprint(model.clip), "bank_layers": list(model.bank_layers),
                "decoder_layers": list(model.decoder_layers), "prompt_depth": model.J,
                "image_size": model.image_size, "feature_dim": int(model.d_v), "device": device,
                "backend": pick_backend(device)}
        with open(os.path.join(out, f"worker-{rank}.json"), "w") as f:
            json.dump(meta, f)
        if acfg.trains and rank == 0:
            with open(os.path.join(out, "prompts.safetensors"), "wb") as f:
                f.write(st_save(model.prompt_state()))
            with open(os.path.join(out, "train_log.json"), "w") as f:
                json.dump(epoch_log, f)
        scorer = Scorer(model, {}, device)
        for product in mine:
            images, shots, heldout = data[product]
            try:
                fit = fit_product(product, images, shots, heldout, scorer, pick_backend(device))
            except Exception as e:
                raise RuntimeError(f"product {product!r}: {e}") from e
            with open(os.path.join(out, artifact.bank_file(product)), "wb") as f:
                f.write(fit.bank.to_bytes())
            spec = artifact.ProductSpec(threshold=fit.threshold, calibration=fit.calibration,
                                        n_calibration=len(fit.calibration_scores), shots=fit.shots,
                                        n_patches=fit.bank.n_patches, bank_file=artifact.bank_file(product),
                                        map_scales=fit.map_scales)
            with open(os.path.join(out, artifact.fit_file(product)), "w") as f:
                json.dump({"product": product, "spec": spec.__dict__,
                           "calibration_scores": fit.calibration_scores}, f)
        ray.train.report({"products_fitted": len(mine)}, checkpoint=ray.train.Checkpoint.from_directory(out))


def _latest_checkpoint(uri: str) -> str | None:
    try:
        files = [u for u in storage.list_files(uri) if u.rsplit("/", 1)[-1].startswith("epoch-")]
    except FileNotFoundError:
        return None
    return max(files) if files else None


def check_weights(backbone: str, weights: str) -> None:
    """Fail on the driver, before any worker starts, for an unknown architecture or hub tag."""
    import open_clip

    from pipeline.weights import weights_kind

    if backbone not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {backbone!r}")
    if weights_kind(weights) == "hub" and weights not in open_clip.list_pretrained_tags_by_model(backbone):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(backbone)) or "none"
        raise ValueError(f"{weights!r} is neither a file nor a pretrained tag of {backbone} (tags: {tags}); "
                         "pass a tag, a local file, an s3:// URI, or 'random'")


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

    check_weights(cfg.backbone, cfg.weights)
    products = products_in(cfg.archive, cfg.deployment)
    unknown = sorted(set(cfg.prompt_products) - set(products))
    if unknown:
        raise ValueError(f"prompt products {unknown} have no train images in the archive")
    loop_cfg = {"products": products, "archive": storage.normalize(cfg.archive), "deployment": cfg.deployment,
                "shots": cfg.shots, "seed": cfg.seed, "backbone": cfg.backbone, "weights": cfg.weights,
                "anople": cfg.anople.to_dict(), "use_gpu": cfg.use_gpu, "restart": cfg.restart,
                "storage_path": storage.normalize(cfg.storage_path), "run_key": cfg.run_key(),
                "prompt_products": list(cfg.prompt_products)}
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
    resolved = cfg.anople.to_dict() | {"bank_layers": w0["bank_layers"], "decoder_layers": w0["decoder_layers"],
                                        "prompt_depth": w0["prompt_depth"]}
    spec = artifact.ModelSpec(
        deployment=cfg.deployment, backbone=cfg.backbone, weights=cfg.weights, weights_kind=weights_kind(cfg.weights),
        weights_fingerprint=w0["fingerprint"], seed=cfg.seed, image_size=w0["image_size"],
        bank_layers=w0["bank_layers"], shots=cfg.shots, feature_dim=w0["feature_dim"], anople=resolved,
        prompts_file="prompts.safetensors" if cfg.anople.trains else "")
    summary = {"device": w0["device"], "knn_backend": w0["backend"], "calibration": {}, "epochs": []}
    log_path = os.path.join(out_dir, "train_log.json")
    if os.path.exists(log_path):
        summary["epochs"] = json.load(open(log_path))
    for p in products:
        path = os.path.join(out_dir, artifact.fit_file(p))
        if not os.path.exists(path):
            raise RuntimeError(f"no worker fitted product {p!r}")
        fit = json.load(open(path))
        spec.products[p] = artifact.ProductSpec(**fit["spec"])
        summary["calibration"][p] = fit["calibration_scores"]
    artifact.save_spec(spec, out_dir)
    return spec, summary
