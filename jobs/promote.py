"""python -m jobs.promote --deployment D (--version N | --from-alias candidate) --to production [--force]"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import entrypoint, new_parser, summary


def parser() -> argparse.ArgumentParser:
    ap = new_parser("promote", "Move a registry alias to a model version (gated: evaluated, pretrained weights).")
    ap.add_argument("--deployment", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--version")
    src.add_argument("--from-alias")
    ap.add_argument("--to", required=True, help="alias to set, e.g. production")
    ap.add_argument("--force", action="store_true", help="promote even a random-init-backbone or not-evaluated version")
    return ap


@entrypoint("promote")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline import registry
    mv = registry.get_version(args.deployment, version=args.version, alias=args.from_alias)  # resolved once
    _compare(args.deployment, mv, args.to)
    mv = registry.promote(args.deployment, args.to, version=mv.version, force=args.force)
    if mv.tags.get("weights_kind") == "random":
        print(registry.RANDOM_WEIGHTS_BANNER)
    print(f"{registry.model_name(args.deployment)} version {mv.version} is now {args.to!r} "
          f"(aliases: {', '.join(mv.aliases)})")
    summary(model=registry.model_name(args.deployment), version=str(mv.version), alias=args.to,
            aliases=list(mv.aliases), weights_kind=mv.tags.get("weights_kind"))
    return 0


def _compare(deployment: str, mv, to_alias: str) -> None:
    """The version's evaluation beside the one now holding `to_alias` (mean metrics, %)."""
    from pipeline import registry
    from pipeline.errors import NotFoundError
    from pipeline.evaluation.metrics import METRICS
    try:
        current = registry.get_version(deployment, alias=to_alias)
    except NotFoundError:
        current = None
    rows = [(f"version {mv.version} (to promote)", registry.evaluation_of(mv))]
    if current is not None:
        rows.append((f"version {current.version} (now {to_alias})", registry.evaluation_of(current)))
    print(f"{'':<28}" + "".join(f"{m:>14}" for m in METRICS))
    for name, ev in rows:
        cells = "".join(f"{100 * ev[m]:>14.1f}" if ev and m in ev else f"{'-':>14}" for m in METRICS)
        print(f"{name:<28}{cells}" + ("" if ev else "   (not evaluated)"))


if __name__ == "__main__":
    sys.exit(main())
