"""anople threshold --deployment D --product P (--sensitivity S | --value T) [--from-alias production]

Set a product's operating point without retraining and register it as a new version (alias 'candidate'), the
change recorded. --sensitivity S (0 < S < 1) is the share of the product's normal calibration images the new
threshold flags (their 1 - S quantile); --value T is the threshold itself. Prints the old and new points with
what each flags on the last scored night; promote shows them again beside the version in production.
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import entrypoint, new_parser, summary


def parser() -> argparse.ArgumentParser:
    ap = new_parser("threshold", __doc__.split("\n\n")[1])
    ap.add_argument("--deployment", required=True)
    ap.add_argument("--product", required=True)
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--sensitivity", type=float, help="share of normal calibration images flagged, 0 < S < 1")
    how.add_argument("--value", type=float, help="the threshold: a finite positive image score")
    ap.add_argument("--from-alias", default="production", help="the version whose operating point changes")
    return ap


@entrypoint("threshold")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline import registry
    from pipeline.operations.threshold import set_operating_point
    r = set_operating_point(args.deployment, args.product, args.sensitivity, args.value, args.from_alias)
    if r["random_weights"]:
        print(registry.RANDOM_WEIGHTS_BANNER)
    print(f"registered {registry.model_name(args.deployment)} version {r['model_version']} (alias: candidate) from "
          f"version {r['parent_version']} ({args.from_alias})")
    n = r["last_night"]
    print(f"{'':<10}{'threshold':>12}  {'flagged on ' + n['date'] if n else 'no night scored yet':<24}operating point")
    for name, pt, key in (("old", r["old"], "old"), ("new", r["new"], "new")):
        flags = f"{n['flags'][key]} of {n['scored']}" if n else "-"
        print(f"{name:<10}{pt['threshold']:>12.5g}  {flags:<24}{pt['how']}")
    print(f"  lineage: {r['lineage']}")
    summary(model=registry.model_name(args.deployment), version=r["model_version"], alias="candidate",
            parent_version=r["parent_version"], product=r["product"], old=r["old"], new=r["new"],
            last_night=r["last_night"], lineage=r["lineage"], random_weights=r["random_weights"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
