"""anople: one command for every job (`python -m jobs.<verb>` keeps working).

    anople ingest | train | evaluate | promote | score | report | add-product | feedback | threshold | submit  [options]   (anople <verb> --help)

Nothing heavy is imported before a verb's arguments are parsed, so --help answers at once.
"""
from __future__ import annotations

import importlib
import sys

from jobs import cli
from pipeline.errors import EXIT_USAGE

VERBS = {  # verb -> (module, one line)
    "ingest": ("jobs.ingest", "turn an image folder or S3 prefix into archive shards of a deployment and date"),
    "train": ("jobs.train", "fit a deployment's model with Ray Train, register it as alias 'candidate'"),
    "evaluate": ("jobs.evaluate", "score the labelled test split with a registered model (or the paper's protocol)"),
    "promote": ("jobs.promote", "move a registry alias (e.g. production) to a version, behind the gates"),
    "score": ("jobs.score", "score one night, publish scores, heatmaps and the night's report"),
    "report": ("jobs.report", "rebuild a published night's HTML report"),
    "add-product": ("jobs.add_product", "add products to a trained model without retraining (a new candidate version)"),
    "feedback": ("jobs.feedback", "inspectors' verdicts into the banks, thresholds and defect set (a new candidate)"),
    "threshold": ("jobs.threshold", "set a product's operating point without retraining (a new candidate version)"),
    "submit": ("jobs.submit", "submit a verb to a Ray cluster under a deterministic id (a retry attaches, never doubles)"),
}


def usage() -> str:
    verbs = "\n".join(f"  {v:<13}{line}" for v, (_, line) in VERBS.items())
    return (f"usage: anople <verb> [options]   (anople <verb> --help for its options)\n\n"
            f"Few-shot anomaly detection (AnoPLe) over factory image archives, on Ray and MLflow.\n\n"
            f"verbs:\n{verbs}\n\nEvery verb takes --json (one JSON summary on stdout for schedulers).\n"
            f"{cli.EXIT_CODES}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"anople: error: unknown verb {verb!r}; choose from {', '.join(VERBS)}", file=sys.stderr)
        return EXIT_USAGE
    cli.PROG = "anople {}"
    return importlib.import_module(VERBS[verb][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
