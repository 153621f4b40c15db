"""python -m jobs.train --deployment D --archive URI --shots K [--seed S] [--backbone ARCH] [--weights W]

Fits the deployment's model with Ray Train, logs it to MLflow, registers a new version of
anople-<D> and points alias 'candidate' at it.
"""
from __future__ import annotations

import argparse
import sys

from jobs import cli
from jobs.cli import entrypoint, new_parser, summary
from pipeline.model import DEFAULT_BACKBONE, DEFAULT_WEIGHTS
from pipeline.model.config import PROMPT_MODES


def parser() -> argparse.ArgumentParser:
    ap = new_parser("train", __doc__.split("\n\n")[1])
    ap.add_argument("--deployment", required=True)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--shots", type=int, required=True, help="normal shots per product (1-4 in the paper)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE, help="open_clip architecture")
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS,
                    help="open_clip pretrained tag, local checkpoint file, s3:// URI, or 'random'")
    ap.add_argument("--config", help="AnoPLe config YAML (every knob and ablation switch); flags below override it")
    ap.add_argument("--epochs", type=int, help="prompt-learning epochs, at most (config default: 12); each is "
                                               "--steps-per-epoch optimiser steps, then a validation")
    ap.add_argument("--steps-per-epoch", type=int, help="optimiser steps per epoch (config default: 25)")
    ap.add_argument("--prompt-mode", choices=PROMPT_MODES,
                    help="ablation: bidirectional (default), T->I, I->T, text only, visual only, none (= memory bank only)")
    ap.add_argument("--bank-layers", default="", help="comma-separated 1-based blocks (default: 3,8 scaled to depth)")
    ap.add_argument("--class-name", action="append", default=[], metavar='PRODUCT="WORDS"',
                    help='the words the prompts use for a product (repeatable), e.g. pcb1="printed circuit board"; '
                         "default: the known dataset code's words (VisA, Real-IAD), else the product's name")
    ap.add_argument("--restart", action="store_true", help="do not resume from this run's epoch checkpoints")
    ap.add_argument("--num-workers", type=int, default=1,
                    help="Ray Train workers: each step's views and the products' banks are split among them")
    ap.add_argument("--cpus-per-worker", type=int, default=0,
                    help="CPUs each Ray Train worker reserves and runs torch on (default: the smallest eligible "
                         "node's cores shared by the workers that land on it)")
    ap.add_argument("--storage-path", default="", help="Ray Train storage (default <ANOPLE_ROOT>/ray_results)")
    return ap


@entrypoint("train")
def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.shots < 1:
        ap.error("--shots must be >= 1")
    if args.num_workers < 1 or args.cpus_per_worker < 0:
        ap.error("--num-workers must be >= 1 and --cpus-per-worker >= 0 (0: sized to the nodes)")
    try:
        bank_layers = [int(x) for x in args.bank_layers.split(",") if x] or None
    except ValueError:
        ap.error(f"--bank-layers wants comma-separated integers, got {args.bank_layers!r}")
    named = cli.class_names(ap, args.class_name)
    import dataclasses

    import numpy as np

    from pipeline import registry
    from pipeline.cluster import has_gpus, init_ray
    from pipeline.fitting.config import TrainConfig, load_config
    from pipeline.fitting.run import train_and_register
    from pipeline.fitting.validation import verdict
    from pipeline.fitting.weights import check_weights
    check_weights(args.backbone, args.weights)  # before any cluster work: a typo fails in a second
    anople = load_config(args.config, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, prompt_mode=args.prompt_mode, seed=args.seed,
                         bank_layers=bank_layers, fusion="bank" if args.prompt_mode == "none" else None)
    anople = dataclasses.replace(anople, class_names=anople.class_names | named)  # the command line wins
    init_ray()
    cfg = TrainConfig(deployment=args.deployment, archive=args.archive, shots=args.shots, seed=args.seed,
                      backbone=args.backbone, weights=args.weights, anople=anople, restart=args.restart,
                      num_workers=args.num_workers, use_gpu=has_gpus(), storage_path=args.storage_path,
                      cpus_per_worker=args.cpus_per_worker)
    mv, spec, fit = train_and_register(cfg)
    if spec.is_random:
        print(registry.RANDOM_WEIGHTS_BANNER)
    print(f"registered {registry.model_name(args.deployment)} version {mv.version} (alias: candidate); "
          f"run {mv.run_id}; products: {', '.join(sorted(spec.products))}")
    print(f"  AnoPLe: prompts {spec.anople['prompt_mode']}, fusion {spec.anople['fusion']}, "
          f"image score {spec.anople['image_score']}, "
          f"epochs {spec.anople['epochs'] if spec.prompts_file else 0}")
    secs = [e["epoch_seconds"] for e in fit["epochs"]]
    if secs:  # this run's epochs (a resumed run trains only the rest)
        print(f"  prompt learning on {fit['device']}: {len(secs)} epoch(s) this run, "
              f"{np.mean(secs):.2f} s/epoch (first {secs[0]:.2f} s, median {np.median(secs):.2f} s)")
    if fit["validation"]:
        line, warning = verdict(fit["validation"])
        print(f"  {line}")
        if warning:
            print(f"WARNING: {warning}", file=sys.stderr)
    for p, ps in sorted(spec.products.items()):
        print(f"  {p} (\"{ps.class_name}\"): threshold {ps.threshold:.5f} from {ps.calibration} (n={ps.n_calibration})")
    summary(model=registry.model_name(args.deployment), version=str(mv.version), run_id=mv.run_id, alias="candidate",
            products=sorted(spec.products), random_weights=spec.is_random, device=fit["device"],
            epochs=len(secs), validation=fit["validation"],
            thresholds={p: ps.threshold for p, ps in spec.products.items()})
    skipped = [s for p in sorted(fit["skipped"]) for s in fit["skipped"][p]]
    summary(skipped=skipped)
    if skipped:
        print(f"WARNING: {len(skipped)} normal train image(s) do not decode and were left out:", file=sys.stderr)
        for s in skipped[:20]:
            print(f"  {s}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
