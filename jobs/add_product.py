"""anople add-product --deployment D --archive URI --products P [P ...] --shots K [--from-alias production]

A new product line on the deployment's trained model the same day, without retraining: K normal train shots of
each new product from the archive give its memory bank, threshold and class text features with the parent
version's trained prompts. Registers a new version (parent recorded, the products marked "not in prompt training")
and points alias 'candidate' at it; evaluate and promote it as any other.
"""
from __future__ import annotations

import argparse
import sys

from jobs import cli
from jobs.cli import entrypoint, new_parser, summary


def parser() -> argparse.ArgumentParser:
    ap = new_parser("add-product", __doc__.split("\n\n")[1])
    ap.add_argument("--deployment", required=True)
    ap.add_argument("--archive", required=True, help="archive holding the new products' normal train images")
    ap.add_argument("--products", nargs="+", required=True, metavar="P", help="the products to add")
    ap.add_argument("--shots", type=int, required=True, help="normal shots per new product (1-4 in the paper)")
    ap.add_argument("--from-alias", default="production", help="the version whose prompts the products use")
    ap.add_argument("--class-name", action="append", default=[], metavar='PRODUCT="WORDS"',
                    help="the words a new product's prompts use (default: a known dataset code's, else its name)")
    ap.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu or cuda")
    return ap


@entrypoint("add-product")
def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.shots < 1:
        ap.error("--shots must be >= 1")
    named = cli.class_names(ap, args.class_name, args.products)
    from pipeline import registry
    from pipeline.operations.add_product import add_products
    r = add_products(args.deployment, args.archive, args.products, args.shots, args.from_alias, args.device, named)
    if r["random_weights"]:
        print(registry.RANDOM_WEIGHTS_BANNER)
    print(f"registered {registry.model_name(args.deployment)} version {r['model_version']} (alias: candidate) from "
          f"version {r['parent_version']} ({args.from_alias}) in {r['seconds']:.1f} s on {r['device']}, no retraining")
    for p, a in sorted(r["added"].items()):
        print(f"  + {p} (\"{a['class_name']}\"): {len(a['shots'])} shot(s), threshold {a['threshold']:.5f} from "
              f"{a['calibration']} (n={a['n_calibration']}); not in prompt training")
        if a["skipped_undecodable"]:
            print(f"WARNING: {p}: {len(a['skipped_undecodable'])} normal image(s) do not decode and were left out",
                  file=sys.stderr)
    print(f"  lineage: {r['lineage']}")
    summary(model=registry.model_name(args.deployment), version=r["model_version"], alias="candidate",
            parent_version=r["parent_version"], products_added=r["products_added"], added=r["added"],
            lineage=r["lineage"], seconds=r["seconds"], random_weights=r["random_weights"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
