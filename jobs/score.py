"""python -m jobs.score --deployment D --archive URI --date YYYY-MM-DD --output URI [--model-alias production]"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from jobs.cli import entrypoint, new_parser, summary
from pipeline.errors import EXIT_DRIFT, EXIT_FAILURE
from pipeline.sources.decoding import DECODE_CHOICES  # numpy and PIL only: --help stays light


def parser() -> argparse.ArgumentParser:
    ap = new_parser("score", "Score one night's images with a registered model; publish scores, heatmaps and a report.")
    ap.add_argument("--deployment", required=True)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--date", required=True, help="YYYY-MM-DD partition to score, or 'yesterday' / 'today' "
                                                  "(in --timezone, when the job starts: for schedulers)")
    ap.add_argument("--timezone", default="UTC", help="IANA time zone of 'yesterday' / 'today'")
    ap.add_argument("--output", required=True, help="output root for scores/ and heatmaps/ (local or s3://)")
    ap.add_argument("--model-alias", default="production")
    ap.add_argument("--bank-budget-mb", type=float, default=None,
                    help="per-actor memory-bank budget; banks above it are sharded across actors by product")
    ap.add_argument("--actors-per-shard", type=int, default=None,
                    help="scoring actors per bank shard (default: one per GPU of the cluster; 1 without GPUs, "
                         "where one actor's torch threads use the cores). More actors than GPUs share them, so "
                         "one actor's host work overlaps another's GPU work")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-error-rate", type=float, default=0.05,
                    help="fail (exit 1, nothing published) when more than this fraction of rows fail for "
                         "infrastructure reasons (scoring or heatmap-write failures, crashed processes)")
    ap.add_argument("--heatmap-side", type=int, default=None,
                    help="store each heatmap with its long side at most this many pixels (default: the model's "
                         "input size; decode: anomaly = v / 65535 * heatmap_scale, bilinear to the row's height x width)")
    ap.add_argument("--heatmap-full-res", action="store_true",
                    help="store each heatmap at its image's full resolution (slow and large at archive scale)")
    ap.add_argument("--decode", choices=DECODE_CHOICES, default="auto",
                    help="where JPEGs are decoded: cpu (Ray CPU tasks, reduced-size JPEG decode), device (the "
                         "scoring actors: nvJPEG on a GPU; other formats stay on the CPU) or auto (device where the "
                         "scoring actors hold GPUs, cpu otherwise)")
    ap.add_argument("--no-resume", dest="resume", action="store_false",
                    help="score every row again instead of adopting the rows that an ended (killed, failed) run of "
                         "this night committed with the same model version and options (the default resumes)")
    ap.add_argument("--skip-published", action="store_true",
                    help="when the night is already published with the same model version and options, rescore "
                         "nothing and exit 0 (a scheduler's rerun of a finished night)")
    ap.add_argument("--fail-on-drift", action="store_true",
                    help="exit 4 when a product's scores drifted (after publishing the night as it is)")
    return ap


@entrypoint("score")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline import registry
    from pipeline.cluster import init_ray
    from pipeline.nightly.run import ScoreOptions, score_night
    from pipeline.sources import archive

    # the options travel whole: each ScoreOptions field is the flag of the same name (checked there)
    options = ScoreOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ScoreOptions)})
    args.date = archive.resolve_date(args.date, args.timezone)
    from pipeline import storage
    for uri in (args.archive, args.output):  # a bad URI (credentials in it, an unknown scheme) before Ray starts
        storage.normalize(uri)
    init_ray()
    s = score_night(archive.Partition(args.archive, args.deployment, args.date), args.output, options)
    if s["random_weights"]:
        print(registry.RANDOM_WEIGHTS_BANNER)
    if s.get("skipped"):
        print(f"published already: {s['rows_out']} rows by run {s['published_run']} with model version "
              f"{s['model_version']}; nothing rescored")
        print(f"scores:   {s['scores_uri']}")
        summary(**{k: v for k, v in s.items() if k != "stale_runs_failed"}, deployment=args.deployment, date=args.date)
        return 0
    print(f"scored {s['rows_out']} of {s['rows_in']} rows with model version {s['model_version']} "
          f"({s['bank_shards']} bank shard(s)): {s['ok']} ok, {s['error']} error, {s['anomalous']} anomalous; "
          f"{s['images_per_s']:.1f} images/s")
    if s["resumed_rows"]:
        print(f"resumed: {s['resumed_rows']} rows adopted from run(s) {', '.join(s['resumed_from'])}; "
              f"{s['scored_rows']} scored by this run")
    print(f"scores:   {s['scores_uri']}")
    print(f"heatmaps: {s['heatmaps_uri']}")
    print(f"report:   {s['report_uri'] or 'not written: ' + s['report_error']}")
    d = s.get("drift")
    if d is not None:
        print(f"drift:    {', '.join(d['flagged']) + ' drifted' if d['flagged'] else 'none'} (KS on presumed-normal "
              f"scores, p < {d['settings']['alpha']:g} and D >= {d['settings']['d_min']:g}; alarm rate > "
              f"{d['settings']['alarm_rate_max']:g})")
        for line in d["lines"]:
            print(f"  DRIFT {line}")
    print(f"mlflow run: {s['run_id']}")
    summary(**{k: v for k, v in s.items() if k != "stale_runs_failed"}, deployment=args.deployment, date=args.date)
    # published, yet a scheduler must see it: a night in which no row scored (every row an unknown product or
    # undecodable: a wrong --product at ingest, a camera writing garbage) and a report that failed exit 1
    failed = []
    if s["rows_in"] and not s["ok"]:
        failed.append(f"no row of the night scored ({s['error']} error rows, published as they are)")
    if s.get("report_error"):
        failed.append(f"the report failed: {s['report_error']}")
    if s.get("drift_error"):
        failed.append(f"the drift test failed: {s['drift_error']}")
    if failed:
        summary(published=True, no_row_scored=not s["ok"], failed=failed)
        for f in failed:
            print(f"score: error: {f}", file=sys.stderr)
        return EXIT_FAILURE
    if args.fail_on_drift and d and d["flagged"]:
        print(f"score: drift: {', '.join(d['flagged'])} drifted; the night is published (--fail-on-drift)",
              file=sys.stderr)
        summary(published=True, failed=[f"drift: {line}" for line in d["lines"]])
        return EXIT_DRIFT
    return 0


if __name__ == "__main__":
    sys.exit(main())
