"""python -m jobs.report --deployment D --date YYYY-MM-DD --output URI [--top N]: rebuild a published night's
HTML report (jobs.score writes it after each publish) at <output>/reports/deployment=D/date=X/report.html."""
from __future__ import annotations

import argparse
import sys

from jobs.cli import entrypoint, new_parser, summary


def parser() -> argparse.ArgumentParser:
    ap = new_parser("report", "Rebuild the HTML report of a published night.")
    ap.add_argument("--deployment", required=True)
    ap.add_argument("--date", required=True, help="YYYY-MM-DD of the published night, or 'yesterday' / 'today'")
    ap.add_argument("--timezone", default="UTC", help="IANA time zone of 'yesterday' / 'today'")
    ap.add_argument("--output", required=True, help="the scoring output root (local or s3://)")
    ap.add_argument("--top", type=int, default=6, help="overlays per product (the most anomalous images)")
    return ap


@entrypoint("report")
def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.top < 0:
        ap.error("--top must be >= 0")
    from pipeline.nightly import nights, report  # after parsing: --help stays fast
    from pipeline.sources import archive
    args.date = archive.resolve_date(args.date, args.timezone)
    from pipeline import lineage
    night = nights.Night(args.output, args.deployment, args.date)
    marker = night.published()
    # a newer candidate's operating points beside the night's (none when the night was never published: the
    # report then says so)
    points = lineage.candidate_points(args.deployment, marker["model_version"]) if marker else {}
    line = lineage.lineage_of(args.deployment, marker["model_version"]) if marker else ""
    uri, summary_ = report.write(night, args.top, points, line)
    for p, c in summary_["products"].items():
        print(f"  {p}: {c['scored']} scored, {c['anomalous']} anomalous, {c['error']} error")
    print(f"report: {uri}")
    summary(report_uri=uri, **summary_)
    return 0


if __name__ == "__main__":
    sys.exit(main())
