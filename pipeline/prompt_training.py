"""AnoPLe prompt learning on a deployment's normal shots (no Ray here: the Ray Train worker calls it).

One step: every shot gets, with probability pseudo_prob, a pixel-space pseudo-anomaly (exact mask) or a
latent-space one (noised patch tokens); each image is seen as the global view (prefix c_0) and, with
multiscale, as the 4 quadrant crops of its 2x resize (prefixes c_1..c_4); then
L = L_pixel (focal + dice) + L_img + L_align. SGD with cosine decay; checkpoints every epoch.
`train_prompts` is the one loop every caller runs: Ray Train workers, the ablations and the tests.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
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
from pipeline.model.losses import align_loss, dice_loss, focal_loss, image_loss
from pipeline.model.pseudo import KINDS, latent_mask_pixels, latent_region, pixel_anomaly


@dataclass
class ShotBatch:
    pixels: torch.Tensor        # [N, 3, S, S] normalised normal shots
    product_index: torch.Tensor  # [N] index into products
    products: list[str]

    def rows(self, idx) -> "ShotBatch":
        return ShotBatch(self.pixels[idx], self.product_index[idx], self.products)

    def shard(self, rank: int, world: int) -> "ShotBatch":
        """Worker `rank`'s share for data-parallel training: every world-th shot."""
        if len(self.pixels) < world:
            raise UsageError(f"{len(self.pixels)} training shots cannot feed {world} workers: use fewer workers")
        return self.rows(slice(rank, None, world))


class Views(NamedTuple):
    """One training step's views of a batch of shots (V = N, or 5N with the quadrant views)."""
    x: torch.Tensor               # [V, 3, S, S] pixels, some with a pixel-space pseudo-anomaly
    scale: torch.Tensor           # [V] prefix index: 0 global view, 1..4 quadrant
    product_index: torch.Tensor   # [V] index into ShotBatch.products
    mask: torch.Tensor            # [V, S, S] 1 where the view is anomalous (pixel or latent)
    label: torch.Tensor           # [V] 1 if the view holds any anomaly
    latent: torch.Tensor | None   # [V, HW, d_v] noise for the latent pseudo-anomaly, zero elsewhere


def make_views(model: AnoPLe, shots: ShotBatch, gen: torch.Generator) -> Views:
    """Pseudo-anomalies + multi-scale views of a batch of shots."""
    cfg, S = model.cfg, model.image_size
    xs, masks, latents = [], [], []
    for img in shots.pixels:  # img [3, S, S]
        mask = torch.zeros(S, S)
        region = torch.zeros(model.grid[0] * model.grid[1], dtype=torch.bool)  # [HW] latent region
        if torch.rand(1, generator=gen).item() < cfg.pseudo_prob:
            kinds = (["pixel"] if cfg.pseudo_pixel else []) + (["latent"] if cfg.pseudo_latent else [])
            if kinds:
                kind = kinds[int(torch.randint(0, len(kinds), (1,), generator=gen))]
                if kind == "pixel":
                    img, mask = pixel_anomaly(img, KINDS[int(torch.randint(0, len(KINDS), (1,), generator=gen))], gen)
                else:
                    region = latent_region(model.grid, gen)
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
        pix_mask = mask * (~region.any(1)).float().view(n, 1, 1)  # [n, S, S]
        qx = quadrant_views(x, S)  # [4n, 3, S, S]
        qm = (quadrant_views(pix_mask.unsqueeze(1), S)[:, 0] > 0.5).float()  # [4n, S, S]
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


def step_losses(model: AnoPLe, views: Views, products: list[str], device: str = "cpu") -> dict:
    """Forward one batch of views; returns each loss term and their sum."""
    cfg = model.cfg
    text = model.encode_text(products)  # [P, 2, D]
    latent = None if views.latent is None else views.latent.to(device)
    enc = model.encode_image(views.x.to(device), scale=views.scale if model.prefix is not None else None,
                             latent_noise=latent)
    head = model.text_head(enc, text[views.product_index.to(text.device)])  # text [V, 2, D]
    logits = F.interpolate(head["logits"], size=views.mask.shape[-2:], mode="bilinear",
                           align_corners=False)[:, 0]  # [V, S, S]
    m = views.mask.to(logits.device)
    zero = logits.sum() * 0
    losses = {
        "pixel": focal_loss(logits, m, cfg.focal_gamma) + dice_loss(logits, m) if cfg.use_pixel_loss else zero,
        "img": image_loss(head["image_logits"], views.label.to(logits.device)) if cfg.use_img_loss else zero,
        "align": align_loss(enc.z0, head["s"]) if cfg.use_align_loss else zero,
    }
    losses["total"] = losses["pixel"] + losses["img"] + losses["align"]
    return losses


class PromptTrainer:
    """Epoch loop state: model, optimiser, epoch, RNG; save/load as bytes for checkpoints."""

    def __init__(self, model: AnoPLe, shots: ShotBatch, device: str, batch_size: int | None = None,
                 grad_sync=None, amp: bool = False):
        cfg = model.cfg
        self.model, self.shots, self.device = model, shots, device
        self.batch_size = batch_size or cfg.batch_shots  # shots per optimiser step
        if cfg.optimizer == "adamw":
            self.opt = torch.optim.AdamW(model.parameter_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(model.parameter_groups(), lr=cfg.lr, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay)
        self.epoch = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.grad_sync = grad_sync  # all-reduce of gradients across Ray Train workers
        self.amp = amp and device.startswith("cuda")

    def run_epoch(self) -> dict:
        cfg, model = self.model.cfg, self.model
        model.train()
        for g in self.opt.param_groups:  # cosine decay of each group's own base rate
            g["lr"] = cosine_lr(self.epoch, cfg.epochs, g["base_lr"], cfg.lr_min)
        order = torch.randperm(len(self.shots.pixels), generator=self.gen)
        totals: dict[str, float] = {}
        n = 0
        for i in range(0, len(order), self.batch_size):
            views = make_views(model, self.shots.rows(order[i:i + self.batch_size]), self.gen)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                losses = step_losses(model, views, self.shots.products, self.device)
            self.opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            if self.grad_sync is not None:
                self.grad_sync(model.trainable_parameters())
            self.opt.step()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach())
            n += 1
        self.epoch += 1
        model.eval()
        return {f"loss_{k}": v / max(n, 1) for k, v in totals.items()} | {"epoch": self.epoch}

    def state_bytes(self) -> bytes:
        """Prompt weights (safetensors) + optimiser, epoch and RNG (torch.save of tensors/ints only)."""
        buf = io.BytesIO()
        torch.save({"prompts": st_save(self.model.prompt_state()), "opt": self.opt.state_dict(),
                    "epoch": self.epoch, "gen": self.gen.get_state()}, buf)
        return buf.getvalue()

    def load_state_bytes(self, data: bytes) -> None:
        # weights_only: a checkpoint is data, never code
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        self.model.load_prompt_state(st_load(state["prompts"]))
        self.opt.load_state_dict(state["opt"])
        self.epoch = int(state["epoch"])
        self.gen.set_state(state["gen"])


def cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    """Cosine decay from lr at step 0 to lr_min at `total` (PromptAD's schedule)."""
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
                  on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train the model's prompts and heads on `shots` to `cfg.epochs`, in place. Returns this call's
    per-epoch metrics (a resumed run trains only the remaining epochs).

    With `checkpoints` (a storage URI), resumes from the newest epoch there unless `restart`, and rank 0
    writes one after every epoch. With world > 1 (data-parallel workers), this worker trains on every
    world-th shot and gradients are averaged over the torch.distributed group."""
    if world > 1:
        shots = shots.shard(rank, world)
    trainer = PromptTrainer(model, shots, device, grad_sync=all_reduce_grads if world > 1 else None,
                            amp=device.startswith("cuda"))
    latest = latest_checkpoint(checkpoints) if checkpoints and not restart else None
    if latest:
        trainer.load_state_bytes(storage.read_bytes(latest))
    log = []
    while trainer.epoch < model.cfg.epochs:
        t0 = time.time()
        metrics = trainer.run_epoch()
        metrics["epoch_seconds"] = time.time() - t0
        if checkpoints and rank == 0:  # every epoch: resumable from storage
            storage.write_bytes(storage.join(checkpoints, f"epoch-{trainer.epoch:04d}.pt"), trainer.state_bytes())
        if on_epoch is not None:
            on_epoch(metrics)
        log.append(metrics)
    return log


def all_reduce_grads(params) -> None:
    """Average gradients over the torch.distributed group (data-parallel prompt training)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def shots_batch(images: dict[str, list[np.ndarray]], products: list[str]) -> ShotBatch:
    """{product: [normalised [3,S,S] arrays]} -> ShotBatch."""
    xs, idx = [], []
    for i, p in enumerate(products):
        for a in images.get(p, []):
            xs.append(torch.from_numpy(a))
            idx.append(i)
    if not xs:
        raise UsageError(f"no normal shots to train the prompts on (products {products})")
    return ShotBatch(torch.stack(xs), torch.tensor(idx), products)
