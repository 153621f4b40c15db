"""AnoPLe prompt learning on a deployment's normal shots (no Ray here: the Ray Train worker calls it).

One step: every shot gets, with probability pseudo_prob, a pixel-space pseudo-anomaly (exact mask) or a
latent-space one (noised patch tokens); each image is seen as the global view (prefix c_0) and, with
multiscale, as the 4 quadrant crops of its 2x resize (prefixes c_1..c_4); then
L = L_pixel (focal + dice) + L_img + L_align. The budget is in optimiser steps (an epoch is a fixed number of
them, whatever the number of shots), with cosine decay over all of them; after every epoch a checkpoint
and, with a validation set (pipeline.fitting.validation), a validation that keeps the best epoch and stops early.
`train_prompts` is the one loop every caller runs: Ray Train workers, the ablations and the tests.
"""
from __future__ import annotations

import dataclasses
import io
import math
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.model.anople import AnoPLe, quadrant_views
from pipeline.model.config import IMAGE_SCORES
from pipeline.model.losses import Split, align_loss, dice_loss, focal_loss, image_loss
from pipeline.model.pseudo import KINDS, latent_mask_pixels, latent_region, pixel_anomaly


@dataclass
class ShotBatch:
    pixels: torch.Tensor        # [N, 3, S, S] normalised normal shots, decoded as the scorer decodes them
    product_index: torch.Tensor  # [N] index into products
    products: list[str]
    detail: torch.Tensor | None = None  # [N, 3, 2S, 2S] the same shots at twice the size: the quadrant views'
                                        # source (crop_source "detail"); None: quadrants of an upsample

    def rows(self, idx) -> "ShotBatch":
        return ShotBatch(self.pixels[idx], self.product_index[idx], self.products,
                         None if self.detail is None else self.detail[idx])



class Views(NamedTuple):
    """One training step's views of a batch of shots (V = N, or 5N with the quadrant views)."""
    x: torch.Tensor               # [V, 3, S, S] pixels, some with a pixel-space pseudo-anomaly
    scale: torch.Tensor           # [V] prefix index: 0 global view, 1..4 quadrant
    product_index: torch.Tensor   # [V] index into ShotBatch.products
    mask: torch.Tensor            # [V, S, S] 1 where the view is anomalous (pixel or latent)
    label: torch.Tensor           # [V] 1 if the view holds any anomaly
    latent: torch.Tensor | None   # [V, HW, d_v] noise for the latent pseudo-anomaly, zero elsewhere

    def part(self, rank: int, world: int) -> "Views":
        """Data-parallel worker `rank`'s part of the views: every world-th one."""
        take = slice(rank, None, world)
        return Views(self.x[take], self.scale[take], self.product_index[take], self.mask[take], self.label[take],
                     None if self.latent is None else self.latent[take])


def train_kinds(cfg) -> list[str]:
    """Pixel pseudo-anomaly kinds for training: all but those held out for validation (all, if that is all)."""
    return [k for k in KINDS if k not in cfg.val_kinds] or list(KINDS)


def make_views(model: AnoPLe, shots: ShotBatch, gen: torch.Generator) -> Views:
    """Pseudo-anomalies + multi-scale views of a batch of shots.

    With the shots' detail (crop_source "detail", the paper's): the pixel pseudo-anomaly is drawn on the 2S image,
    the four quadrant views are its 240 px crops (four times the global view's pixels) and the global view is its
    2x2 area average, for clean and perturbed shots alike (so no view differs from its kind by how it was resized).
    Without: everything on the S-pixel shot, the quadrants cut from its bilinear 2x upsample."""
    cfg, S = model.cfg, model.image_size
    pixel = train_kinds(cfg)
    detail = cfg.multiscale and shots.detail is not None
    xs, masks, latents, bigs, big_masks = [], [], [], [], []
    for i in range(len(shots.pixels)):
        img = shots.detail[i] if detail else shots.pixels[i]  # [3, S', S'], S' = 2S with detail
        mask = torch.zeros(img.shape[-2:])
        region = torch.zeros(model.grid[0] * model.grid[1], dtype=torch.bool)  # [HW] latent region
        if torch.rand(1, generator=gen).item() < cfg.pseudo_prob:
            kinds = (["pixel"] if cfg.pseudo_pixel else []) + (["latent"] if cfg.pseudo_latent else [])
            if kinds:
                kind = kinds[int(torch.randint(0, len(kinds), (1,), generator=gen))]
                if kind == "pixel":
                    img, mask = pixel_anomaly(img, pixel[int(torch.randint(0, len(pixel), (1,), generator=gen))], gen,
                                              shape=cfg.pseudo_shape)
                else:
                    region = latent_region(model.grid, gen, shape=cfg.pseudo_shape)
        if detail:
            bigs.append(img)
            big_masks.append(mask)
            img = F.avg_pool2d(img.unsqueeze(0), 2)[0]  # [3, S, S] the global view
            mask = F.max_pool2d(mask.view(1, 1, *mask.shape), 2)[0, 0]  # [S, S] pixels any changed sub-pixel feeds
        if region.any():
            mask = latent_mask_pixels(region, model.grid, S)
        xs.append(img)
        masks.append(mask)
        latents.append(region)
    x, mask, region = torch.stack(xs), torch.stack(masks), torch.stack(latents)  # [N, 3, S, S], [N, S, S], [N, HW]
    n = x.shape[0]
    scale = torch.zeros(n, dtype=torch.long)
    pidx = shots.product_index
    if cfg.multiscale:
        # latent noise lives on the global view's tokens only; quadrants carry the pixel masks
        if detail:
            src, src_mask = torch.stack(bigs), torch.stack(big_masks)  # [n, 3, 2S, 2S], [n, 2S, 2S]
        else:
            src, src_mask = x, mask * (~region.any(1)).float().view(n, 1, 1)  # [n, 3, S, S], [n, S, S]
        qx = quadrant_views(src, S)  # [4n, 3, S, S]
        qm = (quadrant_views(src_mask.unsqueeze(1), S)[:, 0] > 0.5).float()  # [4n, S, S]
        x = torch.cat([x, qx])  # [5n, 3, S, S]
        mask = torch.cat([mask, qm])  # [5n, S, S]
        scale = torch.cat([scale, torch.arange(1, 5).repeat(n)])  # [5n]
        pidx = torch.cat([pidx, pidx.repeat_interleave(4)])  # [5n]
        region = torch.cat([region, torch.zeros(4 * n, region.shape[1], dtype=torch.bool)])  # [5n, HW]
    label = (mask.flatten(1).amax(1) > 0).long()  # [V]
    if not region.any():
        return Views(x, scale, pidx, mask, label, None)
    # latent-space pseudo-anomaly: noise on the region's patch tokens (drawn here, from the run's generator)
    noise = torch.randn(*region.shape, model.d_v, generator=gen) * region.unsqueeze(-1)  # [V, HW, d_v]
    return Views(x, scale, pidx, mask, label, noise)


def step_losses(model: AnoPLe, views: Views, products: list[str], device: str = "cpu",
                split: Split | None = None) -> dict:
    """Forward one batch of views; returns each loss term and their sum. With `split`, `views` are this worker's
    part of the batch and each term is its share of the whole batch's (pipeline.model.losses)."""
    cfg = model.cfg
    text = model.encode_text(products)  # [P, 2, D]
    latent = None if views.latent is None else views.latent.to(device)
    enc = model.encode_image(views.x.to(device), scale=views.scale if model.prefix is not None else None,
                             latent_noise=latent, bank=False)  # the losses read no bank features
    head = model.text_head(enc, text[views.product_index.to(text.device)])  # text [V, 2, D]
    logits = F.interpolate(head["logits"], size=views.mask.shape[-2:], mode="bilinear",
                           align_corners=False)[:, 0]  # [V, S, S]
    m = views.mask.to(logits.device)
    zero = logits.sum() * 0
    losses = {
        "pixel": focal_loss(logits, m, cfg.focal_gamma, split) + dice_loss(logits, m, split=split)
        if cfg.use_pixel_loss else zero,
        "img": image_loss(head["image_logits"], views.label.to(logits.device), split) if cfg.use_img_loss else zero,
        "align": align_loss(enc.z0, head["s"], split) if cfg.use_align_loss else zero,
    }
    losses["total"] = losses["pixel"] + losses["img"] + losses["align"]
    return losses


class PromptTrainer:
    """Training state: model, optimiser, epoch, RNG, and the validation record (best epoch, its prompts,
    epochs without a gain); saved and loaded as bytes for checkpoints."""

    def __init__(self, model: AnoPLe, shots: ShotBatch, device: str, batch_size: int | None = None,
                 amp: bool = False, rank: int = 0, world: int = 1):
        cfg = model.cfg
        self.model, self.shots, self.device = model, shots, device
        self.batch_size = batch_size or cfg.batch_shots  # shots per optimiser step, over all workers
        if cfg.optimizer == "adamw":
            self.opt = torch.optim.AdamW(model.parameter_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(model.parameter_groups(), lr=cfg.lr, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay)
        self.epoch = 0
        # the same seed on every worker: each draws the same batch and the same pseudo-anomalies
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.amp = amp and device.startswith("cuda")
        self.rank, self.world = rank, world
        views = self.batch_size * (5 if cfg.multiscale else 1)
        if world > views:
            raise UsageError(f"a training step has {views} views ({self.batch_size} shots"
                             f"{' x 5 scales' if cfg.multiscale else ''}): it cannot feed {world} workers; "
                             f"use at most {views} workers or a larger batch_shots")
        self.val = ValRecord()

    @property
    def total_steps(self) -> int:
        return self.model.cfg.epochs * self.model.cfg.steps_per_epoch

    def draw(self) -> torch.Tensor:
        """The next step's shot indices [batch_size]: without repeats when the pool is large enough, else
        every shot about equally often (a 1-shot product fills the batch with differently perturbed copies)."""
        n = len(self.shots.pixels)
        reps = -(-self.batch_size // n)  # ceil
        return torch.cat([torch.randperm(n, generator=self.gen) for _ in range(reps)])[:self.batch_size]

    def run_epoch(self) -> dict:
        """One epoch of optimiser steps. Data-parallel (world > 1), every worker draws the whole batch and its
        pseudo-anomalies from the same generator (cheap, on the CPU) and forwards only its part of the views
        (the expensive part); each loss is its share of the whole batch's and the gradients are summed, so the
        step is the one a single worker takes on the whole batch (pipeline.model.losses.Split)."""
        cfg, model = self.model.cfg, self.model
        split = Split(0.0, pool_sum) if self.world > 1 else None
        model.train()
        totals = torch.zeros(4, dtype=torch.float64)  # pixel, img, align, total: this worker's shares
        for i in range(cfg.steps_per_epoch):
            step = self.epoch * cfg.steps_per_epoch + i
            for g in self.opt.param_groups:  # cosine decay over the whole step budget (PromptAD's shape)
                g["lr"] = cosine_lr(step, self.total_steps, g["base_lr"], cfg.lr_min)
            views = make_views(model, self.shots.rows(self.draw()), self.gen)
            if split is not None:
                n = len(views.x)
                views = views.part(self.rank, self.world)
                split = split._replace(share=len(views.x) / n)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                losses = step_losses(model, views, self.shots.products, self.device, split)
            self.opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            if split is not None:
                sum_grads(model.trainable_parameters())
            self.opt.step()
            totals += torch.tensor([float(losses[k].detach()) for k in LOSS_TERMS], dtype=torch.float64)
        if split is not None:  # the workers' shares add up to the whole batch's losses
            totals = pool_sum(totals.to(self.device)).cpu()
        self.epoch += 1
        model.eval()
        return ({f"loss_{k}": float(v) / cfg.steps_per_epoch for k, v in zip(LOSS_TERMS, totals)}
                | {"epoch": self.epoch, "step": self.epoch * cfg.steps_per_epoch})

    def observe(self, metrics: dict) -> dict:
        """Fold one validation (after epoch `self.epoch`; epoch 0 = before training) into the record."""
        cfg = self.model.cfg
        score = metrics[VAL_KEY]
        if self.val.best_epoch < 0 or score > self.val.best + MIN_GAIN:
            self.val.best, self.val.best_epoch, self.val.stale = score, self.epoch, 0
            self.val.best_state = st_save(self.model.prompt_state())
            self.val.best_weight = metrics.get("fusion_weight", -1.0)
            self.val.best_image_score = IMAGE_SCORES[int(metrics["image_score"])] if "image_score" in metrics else ""
        else:
            self.val.stale += 1
        if self.epoch == 0:
            self.val.baseline = dict(metrics)
        self.val.stopped = cfg.patience > 0 and self.val.stale >= cfg.patience
        return {f"val_{k}": v for k, v in metrics.items()} | {"val_best_epoch": self.val.best_epoch}

    def state_bytes(self) -> bytes:
        """Prompt weights (safetensors) + optimiser, epoch, RNG and validation record (torch.save of tensors,
        numbers and bytes only)."""
        buf = io.BytesIO()
        torch.save({"prompts": st_save(self.model.prompt_state()), "opt": self.opt.state_dict(),
                    "epoch": self.epoch, "gen": self.gen.get_state(), "val": self.val.to_dict()}, buf)
        return buf.getvalue()

    def load_state_bytes(self, data: bytes) -> None:
        # weights_only: a checkpoint is data, never code
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        self.model.load_prompt_state(st_load(state["prompts"]))
        self.opt.load_state_dict(state["opt"])
        self.epoch = int(state["epoch"])
        self.gen.set_state(state["gen"])
        self.val = ValRecord.from_dict(state.get("val", {}))


LOSS_TERMS = ("pixel", "img", "align", "total")  # step_losses' terms, in the order they are summed over workers
VAL_KEY = "fused_pixel_auroc"  # what picks the best epoch: the map the scorer deploys
MIN_GAIN = 1e-3                # a smaller rise is noise, not an improvement


@dataclass
class ValRecord:
    best: float = float("-inf")
    best_epoch: int = -1
    stale: int = 0                  # validations since the best one
    stopped: bool = False
    baseline: dict = field(default_factory=dict)  # the validation before any training (epoch 0)
    best_state: bytes = b""         # the best epoch's prompts (safetensors)
    best_weight: float = -1.0       # the fusion weight the validation chose at the best epoch (weighted fusion)
    best_image_score: str = ""      # the image score the validation chose at the best epoch (image_score auto)

    def to_dict(self) -> dict:
        """Numbers and tensors only (what torch.load(weights_only=True) reads back)."""
        state = torch.frombuffer(bytearray(self.best_state), dtype=torch.uint8) if self.best_state else torch.zeros(0, dtype=torch.uint8)
        return {"best": self.best, "best_epoch": self.best_epoch, "stale": self.stale, "stopped": self.stopped,
                "baseline": dict(self.baseline), "best_state": state, "best_weight": self.best_weight,
                "best_image_score": self.best_image_score}

    @classmethod
    def from_dict(cls, d: dict) -> "ValRecord":
        d = dict(d)
        if "best_state" in d:
            d["best_state"] = d["best_state"].numpy().tobytes()
        return cls(**d)


def cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    """Cosine decay from lr at step 0 to lr_min at `total` (PromptAD's schedule, on optimiser steps)."""
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def latest_checkpoint(uri: str) -> str | None:
    """The newest ``epoch-NNNN.pt`` under `uri`, or None."""
    try:
        files = [u for u in storage.list_files(uri) if u.rsplit("/", 1)[-1].startswith("epoch-")]
    except FileNotFoundError:
        return None
    return max(files) if files else None


def train_prompts(model: AnoPLe, shots: ShotBatch, device: str, *, checkpoints: str | None = None,
                  restart: bool = False, rank: int = 0, world: int = 1,
                  on_epoch: Callable[[dict], None] | None = None,
                  validate: Callable[[], dict] | None = None) -> TrainLog:
    """Train the model's prompts and heads on `shots` for up to `cfg.epochs` epochs, in place.

    With `validate` (pipeline.fitting.validation: every rank must call it, it returns the same metrics on each),
    the model is validated before training (the baseline) and after every epoch; training stops after
    `cfg.patience` epochs without a gain and the model ends with the best epoch's prompts. With
    `checkpoints` (a storage URI), resumes from the newest epoch there unless `restart`, and rank 0 writes
    one after every epoch. With world > 1 (data-parallel workers over a torch.distributed group), every worker
    holds all the shots and forwards every world-th view of each step's batch (PromptTrainer.run_epoch): W
    workers train the prompts one worker trains, to float rounding. Returns this call's per-epoch
    metrics (a resumed run trains only the remaining epochs) and the validation record."""
    trainer = PromptTrainer(model, shots, device, amp=device.startswith("cuda"), rank=rank, world=world)
    latest = latest_checkpoint(checkpoints) if checkpoints and not restart else None
    if latest:
        trainer.load_state_bytes(storage.read_bytes(latest))
    if validate is not None and trainer.epoch == 0 and trainer.val.best_epoch < 0:
        trainer.observe(validate())  # epoch 0: the untrained model, what training must beat
    log = TrainLog([], trainer.val)
    while trainer.epoch < model.cfg.epochs and not trainer.val.stopped:
        t0 = time.time()
        metrics = trainer.run_epoch()
        metrics["epoch_seconds"] = time.time() - t0
        if validate is not None:
            metrics |= trainer.observe(validate())
        if checkpoints and rank == 0:  # every epoch: resumable from storage
            storage.write_bytes(storage.join(checkpoints, f"epoch-{trainer.epoch:04d}.pt"), trainer.state_bytes())
        if on_epoch is not None:
            on_epoch(metrics)
        log.epochs.append(metrics)
    if validate is not None and trainer.val.best_state:
        model.load_prompt_state(st_load(trainer.val.best_state))  # the best epoch, not the last
        if model.cfg.fusion == "weighted" and model.cfg.fusion_weight < 0 <= trainer.val.best_weight:
            model.cfg = dataclasses.replace(model.cfg, fusion_weight=trainer.val.best_weight)
        if model.cfg.image_score == "auto" and trainer.val.best_image_score:
            model.cfg = dataclasses.replace(model.cfg, image_score=trainer.val.best_image_score)
    return log


class TrainLog(NamedTuple):
    epochs: list[dict]   # this call's per-epoch metrics
    val: ValRecord       # the validation record (empty without validation)


def pool_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the torch.distributed group (Ray Train's: gloo on CPU, NCCL on GPU); a copy."""
    t = t.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def sum_grads(params) -> None:
    """Sum gradients over the torch.distributed group: each worker's are those of its share of the batch's loss,
    so their sum is the whole batch's gradient (not a mean: the shares already weigh each worker's views)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def shots_batch(images: dict[str, list[np.ndarray]], products: list[str],
                detail: dict[str, list[np.ndarray]] | None = None) -> ShotBatch:
    """{product: [normalised [3,S,S] arrays]} (and the same shots at 2S, `detail`) -> ShotBatch."""
    xs, idx, big = [], [], []
    for i, p in enumerate(products):
        for j, a in enumerate(images.get(p, [])):
            xs.append(torch.from_numpy(a))
            idx.append(i)
            if detail is not None:
                big.append(torch.from_numpy(detail[p][j]))
    if not xs:
        raise UsageError(f"no normal shots to train the prompts on (products {products})")
    return ShotBatch(torch.stack(xs), torch.tensor(idx), products, torch.stack(big) if detail is not None else None)
