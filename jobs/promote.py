"""python -m jobs.promote --deployment D (--version N | --from-alias candidate) --to production [--force]"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import entrypoint
from pipeline import registry


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jobs.promote", description="Move a registry alias to a model version.")
    ap.add_argument("--deployment", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--version")
    src.add_argument("--from-alias")
    ap.add_argument("--to", required=True, help="alias to set, e.g. production")
    ap.add_argument("--force", action="store_true", help="promote even a random-init-backbone version")
    return ap


@entrypoint("promote")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    mv = registry.promote(args.deployment, args.to, version=args.version, from_alias=args.from_alias,
                          force=args.force)
    if mv.tags.get("weights_kind") == "random":
        print(registry.RANDOM_WEIGHTS_BANNER)
    print(f"{registry.model_name(args.deployment)} version {mv.version} is now {args.to!r} "
          f"(aliases: {', '.join(mv.aliases)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
