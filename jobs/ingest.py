"""python -m jobs.ingest SOURCE --archive URI --deployment D --date YYYY-MM-DD [--product P] [--allow-skips]"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import entrypoint, new_parser, summary


def parser() -> argparse.ArgumentParser:
    ap = new_parser("ingest", "Turn an image folder or S3 prefix into archive shards.")
    ap.add_argument("source", help="MVTec-AD layout folder, or a flat folder / S3 prefix of images (with --product)")
    ap.add_argument("--archive", required=True, help="archive root (local path, file:// or s3://)")
    ap.add_argument("--deployment", required=True)
    ap.add_argument("--date", required=True, help="YYYY-MM-DD partition to write")
    ap.add_argument("--product", help="product name for a flat folder of images")
    ap.add_argument("--rows-per-shard", type=int, default=256)
    ap.add_argument("--allow-skips", action="store_true",
                    help="archive the rest when a source file cannot be read (default: the ingest fails, nothing replaced)")
    return ap


@entrypoint("ingest")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline.sources.ingest import ingest
    r = ingest(args.source, args.archive, args.deployment, args.date, args.product, args.rows_per_shard,
               allow_skips=args.allow_skips)
    print(f"ingested {r.rows} images ({r.layout} layout) into {len(r.shards)} shard(s) under "
          f"{r.shards[0].rsplit('/', 1)[0]}; {len(r.undecodable)} undecodable (archived), {len(r.skipped)} skipped")
    for p, n in sorted(r.products.items()):  # this night's rows of the product: before -> after (replaced whole)
        print(f"  {p}: {r.before.get(p, 0)} -> {n} rows")
    summary(rows=r.rows, layout=r.layout, shards=r.shards, products=r.products, rows_before=r.before,
            undecodable=r.undecodable,
            skipped=r.skipped, missing_masks=len(r.missing_masks))
    if r.undecodable:
        print(f"WARNING: {len(r.undecodable)} image(s) do not decode; archived anyway, they will score as errors:",
              file=sys.stderr)
        for u in r.undecodable[:20]:
            print(f"  {u}", file=sys.stderr)
    if r.skipped:
        print(f"WARNING: {len(r.skipped)} source file(s) skipped, not archived:", file=sys.stderr)
        for u in r.skipped[:20]:
            print(f"  {u}", file=sys.stderr)
        if len(r.skipped) > 20:
            print(f"  ... and {len(r.skipped) - 20} more", file=sys.stderr)
    if r.missing_masks:
        print(f"WARNING: {len(r.missing_masks)} defective image(s) have no ground-truth mask", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
