"""anople feedback --deployment D --archive URI --labels FILE [--from-alias production]

Inspectors' verdicts back into the model, without retraining. FILE (CSV or Parquet, local or s3://) has columns
image_id and verdict (normal | defect), optionally date and note, about archived images of scored nights.
Confirmed normals (false alarms) join their product's memory bank (bounded: at most 16 images' worth of feedback
patches, k-center coreset past that) and its threshold is recalibrated; confirmed defects are kept per product as a
labelled evaluation set that evaluate and the promote gate use. Registers a new version (alias 'candidate') with
its parent and the labels file recorded. Unknown image ids, unknown verdicts and repeated ids are reported, never
guessed.
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import entrypoint, new_parser, summary


def parser() -> argparse.ArgumentParser:
    ap = new_parser("feedback", __doc__.split("\n\n")[1])
    ap.add_argument("--deployment", required=True)
    ap.add_argument("--archive", required=True, help="the archive holding the labelled images")
    ap.add_argument("--labels", required=True, help="CSV or Parquet of image_id, verdict[, date, note]")
    ap.add_argument("--from-alias", default="production", help="the version the verdicts change")
    ap.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu or cuda")
    return ap


@entrypoint("feedback")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline import registry
    from pipeline.operations.feedback import apply_feedback
    r = apply_feedback(args.deployment, args.archive, args.labels, args.from_alias, args.device)
    if r["random_weights"]:
        print(registry.RANDOM_WEIGHTS_BANNER)
    c = r["counts"]
    print(f"registered {registry.model_name(args.deployment)} version {r['model_version']} (alias: candidate) from "
          f"version {r['parent_version']} ({args.from_alias}) in {r['seconds']:.1f} s")
    print(f"  {c['rows']} label row(s): {c['normal']} normal into the banks, {c['defect']} defect kept for "
          f"evaluation, {c['problems']} problem(s)")
    for p, d in sorted(r["per_product"].items()):
        if "bank_patches" in d:
            print(f"  {p}: bank {d['bank_patches'][0]} -> {d['bank_patches'][1]} patches (bound {d['bank_bound']}), "
                  f"threshold {d['threshold'][0]:.5g} -> {d['threshold'][1]:.5g} (recalibrated on "
                  f"{d['recalibrated_on']}); its confirmed normals flagged {d['feedback_normals_flagged'][0]} -> "
                  f"{d['feedback_normals_flagged'][1]} of {d['normals_used']}")
        if d.get("defects_kept"):
            print(f"  {p}: {d['defects_kept']} confirmed defect(s) kept: {r['defect_sets'][p]}")
    for line in r["problems"][:50]:
        print(f"  not used: {line}", file=sys.stderr)
    if len(r["problems"]) > 50:
        print(f"  ... and {len(r['problems']) - 50} more (all in the run's feedback.json)", file=sys.stderr)
    print(f"  lineage: {r['lineage']}")
    summary(model=registry.model_name(args.deployment), version=r["model_version"], alias="candidate",
            parent_version=r["parent_version"], counts=c, per_product=r["per_product"], problems=r["problems"],
            defect_sets=r["defect_sets"], labels_sha256=r["labels_sha256"], lineage=r["lineage"], seconds=r["seconds"],
            random_weights=r["random_weights"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
