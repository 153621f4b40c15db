"""python -m jobs.bench.deployment_sizes: does the default recipe learn at every deployment size?

Benchmark, not a test. For each deployment size (products x shots) and seed it generates synthetic
products, fits the full model and the memory bank alone (the real trainer, validation, bank fitting and
scorer, in-process without Ray) and prints, over seeds, the test metrics of both on defect types never
seen in training, the validation gain the training run itself reported, and the fit's seconds.

--sweep chooses a recipe without test data: each candidate (a set of config overrides) is trained at
every size and only its validation gain (pseudo-anomalies held out of training, on held-out normals) is
printed; no test image is scored. The defaults in pipeline/model/config.py were picked so.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np
import torch

from jobs.bench.common import cell, load_data, parse_sets, run_row
from pipeline.evaluation.metrics import PAPER_METRICS
from pipeline.fitting.prompts import train_prompts
from pipeline.fitting.shots import shot_batch, wants_detail
from pipeline.fitting.validation import build_validation, gain, validate
from pipeline.fitting.weights import build_model
from pipeline.model.config import AnoPLeConfig
from pipeline.sources.synthetic import make_mvtec_folder, product_names

# candidates for --sweep: PromptAD's recipe and the ones the validation signal was asked about
SWEEP = {
    "sgd-promptad/harmonic": {"optimizer": "sgd", "lr": 0.002, "head_lr": 0.05, "fusion": "harmonic"},
    "sgd-promptad/weighted": {"optimizer": "sgd", "lr": 0.002, "head_lr": 0.05, "fusion": "weighted"},
    "adamw-2e-3/harmonic": {"optimizer": "adamw", "lr": 0.002, "head_lr": 0.002, "fusion": "harmonic"},
    "adamw-2e-3/weighted": {"optimizer": "adamw", "lr": 0.002, "head_lr": 0.002, "fusion": "weighted"},
    "adamw-heads-1e-2/harmonic": {"optimizer": "adamw", "lr": 0.002, "head_lr": 0.01, "fusion": "harmonic"},
    "adamw-heads-1e-2/weighted": {"optimizer": "adamw", "lr": 0.002, "head_lr": 0.01, "fusion": "weighted"},
}


def sizes_arg(text: str) -> list[tuple[int, int]]:
    """'3x1,15x4' -> [(3, 1), (15, 4)] (products x shots)."""
    out = []
    for part in text.split(","):
        p, _, k = part.partition("x")
        out.append((int(p), int(k)))
    return out


def validation_gain(clip_args, overrides, data, products, seed, device) -> tuple[float, float, float]:
    """Train with validation only (no test image): -> (gain in points, best epoch, seconds)."""
    cfg = AnoPLeConfig(**{"seed": seed, **overrides})
    model = build_model(*clip_args, cfg, device)
    vs = build_validation(data, products, model.image_size, cfg.val_kinds, cfg.val_images, seed)
    t0 = time.time()
    log = train_prompts(model, shot_batch(data, products, model.image_size, wants_detail(model)), device,
                        validate=lambda: validate(model, vs, device))
    g = gain(log.val)
    return g["val_gain_pixel_auroc"], g["val_best_epoch"], time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.bench.deployment_sizes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="anople-small-vit")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--sizes", default="3x1,3x2,3x4,15x1,15x2,15x4", help="products x shots, comma-separated")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--size", type=int, default=128, help="synthetic image size")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--sweep", default="", help=f"comma-separated candidates from {', '.join(SWEEP)}, or 'all': "
                                                "validation gains only, no test image scored")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    common = parse_sets(ap, args.set)
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = sizes_arg(args.sizes)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sweep = list(SWEEP) if args.sweep == "all" else [c for c in args.sweep.split(",") if c]
    if args.weights == "random":
        print("NOTE: random-init backbone: absolute numbers are not the paper's.")
    print(f"backbone {args.backbone} ({args.weights}), sizes {args.sizes}, seeds {seeds}, device {device}, "
          f"config {AnoPLeConfig(**common).to_dict()}")
    out: dict = {}
    for n_products, shots in sizes:
        products = list(product_names(n_products))
        for seed in seeds:
            with tempfile.TemporaryDirectory() as root:
                make_mvtec_folder(root + "/src", tuple(products), n_train=shots + 4, n_test_good=4, n_test_defect=2,
                                  size=args.size, seed=100 + seed)
                data, test = load_data(root, products, shots, seed)
                key = f"{n_products}x{shots}"
                clip_args = (args.backbone, args.weights, seed)
                if sweep:
                    for name in sweep:
                        g, best, t = validation_gain(clip_args, {**common, **SWEEP[name]}, data, products, seed, device)
                        out.setdefault(name, {}).setdefault(key, []).append({"gain": g, "best_epoch": best, "s": t})
                        print(f"  {key} seed {seed} {name:<24} val gain {g:+5.1f} (best epoch {best:.0f}, {t:.0f} s)",
                              flush=True)
                else:
                    full, t, g = run_row(clip_args, common, True, data, test, products, seed, device)
                    bank, _, _ = run_row(clip_args, {**common, "prompt_mode": "none", "fusion": "bank"}, False,
                                         data, test, products, seed, device)
                    out.setdefault(key, []).append({"full": full, "bank": bank, "fit_s": t, "gain": g})
                    print(f"  {key} seed {seed} full " + " ".join(f"{k} {100 * full[k]:5.1f}" for k in PAPER_METRICS)
                          + " | bank " + " ".join(f"{k} {100 * bank[k]:5.1f}" for k in PAPER_METRICS)
                          + f" | val gain {g:+.1f}, image score {full['image_score']}, fit {t:.0f} s", flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"args": vars(args), "results": out}, f, indent=1)
    print()
    if sweep:
        print(f"{'candidate':<26}" + "".join(f"{k:>16}" for k in (f"{p}x{s}" for p, s in sizes)))
        for name in sweep:
            print(f"{name:<26}" + "".join(
                f"{np.mean([r['gain'] for r in out[name][f'{p}x{s}']]):>+10.1f} +-{np.std([r['gain'] for r in out[name][f'{p}x{s}']]):3.1f}"
                for p, s in sizes))
        print("(validation gain in pixel AUROC points over the bank alone; no test image was scored)")
        return 0
    print(f"{'size':<7}{'model':<7}" + "".join(f"{k:>18}" for k in ("I-AUROC", "P-AUROC", "AUPRO"))
          + f"{'val gain':>10}{'fit s':>8}")
    for p, s in sizes:
        rs = out[f"{p}x{s}"]
        for model in ("full", "bank"):
            extra = (f"{np.mean([r['gain'] for r in rs]):>+10.1f}{np.mean([r['fit_s'] for r in rs]):>8.0f}"
                     if model == "full" else "")
            print(f"{p}x{s:<5}{model:<7}" + "".join(cell([r[model][k] for r in rs]) for k in PAPER_METRICS) + extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
