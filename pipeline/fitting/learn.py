"""A deployment fitted in one process: the shared prompts learned on the teaching products' shots (validated on
pseudo-anomalies of their held-out normals), then the banks and thresholds of this process's products. Each Ray
Train worker runs it (pipeline.fitting.worker, with its rank, checkpoints and epoch reports), and so do the
benchmarks and tests in process."""
from __future__ import annotations

import time
from typing import Callable, NamedTuple

from pipeline.fitting.prompts import ValRecord, train_prompts
from pipeline.fitting.shots import ProductFit, ProductShots, fit_products, shot_batch, wants_detail
from pipeline.fitting.validation import ValidationSet, build_validation, on_rank0, validate
from pipeline.model.anople import AnoPLe


class Learned(NamedTuple):
    fits: dict[str, ProductFit]   # this process's products: bank, threshold, calibration
    epochs: list[dict]            # per-epoch metrics of the prompt learning ([] without it)
    validation: ValRecord | None  # the validation record; None when no prompts were learned
    val_set: ValidationSet | None  # the pseudo-anomalies validated on (rank 0 only)
    train_seconds: float          # prompt learning alone, before the products' fitting


def learn_and_fit_products(model: AnoPLe, data: dict[str, ProductShots], teach: list[str], mine: list[str],
                           device: str, seed: int, *, train: bool = True, rank: int = 0, world: int = 1,
                           checkpoints: str | None = None,
                           on_epoch: Callable[[dict], None] | None = None) -> Learned:
    """Learn the prompts on `teach` (when `train` and the config trains them), then fit `mine` with the learned
    encoder. Data-parallel workers pass their rank and world: rank 0 validates and sends the figures to all."""
    cfg = model.cfg
    t0 = time.time()
    epochs, val, vs = [], None, None
    if train and cfg.trains:
        vs = build_validation(data, teach, model.image_size, cfg.val_kinds, cfg.val_images, seed) \
            if cfg.validate and rank == 0 else None

        def check() -> dict:
            return on_rank0(lambda: validate(model, vs, device), rank, world)

        epochs, val = train_prompts(model, shot_batch(data, teach, model.image_size, wants_detail(model)), device, checkpoints=checkpoints,
                                    rank=rank, world=world, on_epoch=on_epoch,
                                    validate=check if cfg.validate else None)
    train_seconds = time.time() - t0
    return Learned(fit_products(model, data, mine, device), epochs, val, vs, train_seconds)
