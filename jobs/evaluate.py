"""python -m jobs.evaluate --deployment D --archive URI [--model-alias candidate]"""
from __future__ import annotations

import argparse
import sys

from pipeline import registry
from pipeline.cluster import init_ray
from pipeline.runs import evaluate

COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")


def format_table(per_product: dict, mean: dict) -> str:
    head = f"{'product':<20}" + "".join(f"{c:>14}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for p, r in per_product.items():
        lines.append(f"{p:<20}" + "".join(f"{100 * r[c]:>14.1f}" for c in COLUMNS))
    lines.append("-" * len(head))
    lines.append(f"{'mean':<20}" + "".join(f"{100 * mean[c]:>14.1f}" for c in COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.evaluate", description="Evaluate a registered model on the labelled test split.")
    ap.add_argument("--deployment", required=True)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--model-alias", default="candidate")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    init_ray()
    try:
        r = evaluate(args.deployment, args.archive, args.model_alias, args.batch_size)
    except (LookupError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if r["random_weights"]:
        print(registry.RANDOM_WEIGHTS_BANNER)
    print(f"{registry.model_name(args.deployment)} version {r['model_version']} (alias {args.model_alias}), "
          "metrics in % (AUPRO to FPR 0.3):")
    print(format_table(r["per_product"], r["mean"]))
    if r["errors"]:
        print(f"{len(r['errors'])} test image(s) could not be scored and are left out:", file=sys.stderr)
        for e in r["errors"][:20]:
            print(f"  {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
