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
    cols = list(METRICS) + ["real_defect_recall"]  # the last: the plant's confirmed defects (feedback)
    print(f"{'':<28}" + "".join(f"{m:>14}" for m in METRICS) + f"{'real defects':>14}")
    for name, ev in rows:
        cells = "".join(f"{100 * ev[m]:>14.1f}" if ev and m in ev else f"{'-':>14}" for m in cols)
        print(f"{name:<28}{cells}" + ("" if ev else "   (not evaluated)"))
    print(f"lineage: {mv.tags.get('lineage') or 'v' + str(mv.version) + ' train'}")
    if current is not None and str(current.version) != str(mv.version):
        _operating_points(deployment, mv, current, to_alias)


def _operating_points(deployment: str, mv, current, to_alias: str) -> dict:
    """The products whose threshold the version changes, old and new side by side with what each flags on the
    last scored night (pipeline.operations.threshold)."""
    from jobs.cli import summary
    from pipeline import lineage
    from pipeline.operations.threshold import night_flags
    from pipeline.errors import PipelineError
    try:
        points = lineage.changed_points(lineage.version_spec(mv), lineage.version_spec(current), str(mv.version))
    except PipelineError as e:  # the table is for the reader; whether the version may move is the gate's call
        print(f"operating points not compared: {e}", file=sys.stderr)
        return {}
    if not points:
        return {}
    print(f"operating points that change ({to_alias} v{current.version} -> v{mv.version}):")
    print(f"  {'product':<16}{'threshold now':>14}{'new':>12}  {'flagged now -> new':<22}new point")
    # one read of the last night for all products; a product new in this version flags nothing "now"
    night = night_flags(deployment, {p: {"now": float("inf") if op["threshold_old"] is None else op["threshold_old"],
                                         "new": op["threshold"]} for p, op in points.items()})
    for p, op in sorted(points.items()):
        old = op["threshold_old"]
        n = night and {"date": night["date"], "output": night["output"], **night["products"][p]}
        flags = f"{n['flags']['now'] if old is not None else '-'} -> {n['flags']['new']} of {n['scored']}" if n else "no night"
        op["last_night"] = n
        print(f"  {p:<16}{(f'{old:.5g}' if old is not None else 'new product'):>14}{op['threshold']:>12.5g}  "
              f"{flags:<22}{op['how']}")
    summary(operating_points=points)
    return points


if __name__ == "__main__":
    sys.exit(main())
