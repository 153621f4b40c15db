"""python -m jobs.evaluate --deployment D --archive URI [--model-alias candidate]

With --protocol, the paper's protocol instead of one registered model: for each k in --shots and each
seed, fit a model (multi-class: one for all products; unseen: leave-one-product-out) and evaluate it;
prints mean +- std over seeds in the paper's table layout. Nothing is registered.
  python -m jobs.evaluate --deployment D --archive URI --protocol --shots 1,2,4 --seeds 0,1,2 \
      [--setting multi-class|unseen] [--backbone ARCH] [--weights W] [--config YAML] [--epochs N] [--steps-per-epoch N]
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import entrypoint, new_parser, summary
from pipeline.model import DEFAULT_BACKBONE, DEFAULT_WEIGHTS


def format_table(per_product: dict, mean: dict) -> str:
    from pipeline.evaluation.metrics import METRICS
    head = f"{'product':<20}" + "".join(f"{c:>14}" for c in METRICS)
    lines = [head, "-" * len(head)]
    for p, r in per_product.items():
        lines.append(f"{p:<20}" + "".join(f"{100 * r[c]:>14.1f}" for c in METRICS))
    lines.append("-" * len(head))
    lines.append(f"{'mean':<20}" + "".join(f"{100 * mean[c]:>14.1f}" for c in METRICS))
    return "\n".join(lines)


def format_protocol(table: dict, setting: str) -> str:
    """Paper layout: one row per product (+ mean), per k a group of I-AUROC / P-AUROC / PRO (mean+-std %)."""
    import numpy as np

    from pipeline.evaluation.metrics import PAPER_METRICS
    ks = sorted(table)
    products = sorted({p for k in ks for p in table[k]})
    head1 = f"{'':<20}" + "".join(f"{f'{k}-shot ({setting})':^45}" for k in ks)
    head2 = f"{'product':<20}" + "".join(f"{'I-AUROC':>15}{'P-AUROC':>15}{'PRO':>15}" for _ in ks)
    lines = [head1, head2, "-" * len(head2)]

    def cell(vals):
        return f"{100 * np.mean(vals):>9.1f}+-{100 * np.std(vals):<4.1f}"

    for p in products:
        lines.append(f"{p:<20}" + "".join(cell(table[k][p][m]) for k in ks for m in PAPER_METRICS))
    lines.append("-" * len(head2))
    # the mean row: per seed, the mean over products; then mean +- std over seeds
    row = f"{'mean':<20}"
    for k in ks:
        for m in PAPER_METRICS:
            per_seed = np.mean([table[k][p][m] for p in table[k]], axis=0)
            row += cell(per_seed)
    lines.append(row)
    return "\n".join(lines)


def _protocol(args) -> int:
    from pipeline import registry
    from pipeline.cluster import has_gpus, init_ray
    from pipeline.evaluation.run import evaluate_protocol
    from pipeline.fitting.config import TrainConfig, load_config
    from pipeline.fitting.weights import check_weights
    check_weights(args.backbone, args.weights)
    anople = load_config(args.config, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch)
    shots = [int(x) for x in args.shots.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    init_ray()
    base = TrainConfig(deployment=args.deployment, archive=args.archive, backbone=args.backbone,
                       weights=args.weights, anople=anople, use_gpu=has_gpus())
    table = evaluate_protocol(base, shots, seeds, args.setting, args.batch_size)
    if args.weights == "random":
        print(registry.RANDOM_WEIGHTS_BANNER)
    print(f"{args.deployment}: {args.setting}, seeds {seeds}, metrics in % (PRO = AUPRO to FPR 0.3)")
    print(format_protocol(table, args.setting))
    summary(setting=args.setting, shots=shots, seeds=seeds, table=table, random_weights=args.weights == "random")
    return 0


def _int_list(text: str) -> str:
    """argparse type: a comma-separated list of integers (kept as text)."""
    try:
        [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants comma-separated integers, got {text!r}") from None
    return text


def parser() -> argparse.ArgumentParser:
    ap = new_parser("evaluate", "Evaluate a registered model on the labelled test split (or, with --protocol, "
                                "the paper's k-shot x seeds protocol).")
    ap.add_argument("--deployment", required=True)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--model-alias", default="candidate")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--protocol", action="store_true", help="run the paper's k-shot x seeds protocol")
    ap.add_argument("--shots", default="1,2,4", type=_int_list)
    ap.add_argument("--seeds", default="0,1,2", type=_int_list)
    ap.add_argument("--setting", default="multi-class", choices=["multi-class", "unseen"])
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE)
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS)
    ap.add_argument("--config")
    ap.add_argument("--epochs", type=int, help="prompt-learning epochs, at most (with --protocol)")
    ap.add_argument("--steps-per-epoch", type=int, help="optimiser steps per epoch (with --protocol)")
    return ap


@entrypoint("evaluate")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.protocol:
        return _protocol(args)
    from pipeline import registry
    from pipeline.cluster import init_ray
    from pipeline.evaluation.run import evaluate
    init_ray()
    r = evaluate(args.deployment, args.archive, args.model_alias, args.batch_size)
    if r["random_weights"]:
        print(registry.RANDOM_WEIGHTS_BANNER)
    print(f"{registry.model_name(args.deployment)} version {r['model_version']} (alias {args.model_alias}), "
          "metrics in % (AUPRO to FPR 0.3):")
    print(format_table(r["per_product"], r["mean"]))
    summary(model=registry.model_name(args.deployment), version=str(r["model_version"]), alias=args.model_alias,
            mean=r["mean"], per_product=r["per_product"], errors=r["errors"], random_weights=r["random_weights"],
            real_defects=r["real_defects"])
    for p, d in sorted(r["real_defects"].items()):
        print(f"  {p}: {d['caught']} of {d['n']} inspector-confirmed defect(s) flagged at its threshold "
              f"(recall {100 * d['recall']:.1f} %)")
    if r["errors"]:
        print(f"{len(r['errors'])} test image(s) could not be scored and are left out:", file=sys.stderr)
        for e in r["errors"][:20]:
            print(f"  {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
