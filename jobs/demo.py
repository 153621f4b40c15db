"""python -m jobs.demo [--root demo-run]: the whole nightly path on a generated sample archive.

Generates synthetic products with defects and exact masks, then ingest -> train -> evaluate -> promote
-> score one night, all under one local root. With network it uses the real default CLIP weights;
offline it uses a random-init backbone and says so loudly (its numbers then mean nothing).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

from pipeline.model import DEFAULT_BACKBONE as BACKBONE
from pipeline.model import DEFAULT_WEIGHTS as TAG
from pipeline.sources.synthetic import DEFECTS, make_mvtec_folder

PRODUCTS = ("tile", "washer", "fabric")


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _step(name: str, rc: int) -> None:
    if rc != 0:
        print(f"demo: step {name!r} failed with exit code {rc}", file=sys.stderr)
        raise SystemExit(rc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.demo", description=__doc__.split("\n\n")[1])
    ap.add_argument("--root", default="demo-run")
    ap.add_argument("--weights", default=None, help="override: tag, file, s3:// or 'random'")
    ap.add_argument("--epochs", type=int, default=3, help="prompt-learning epochs (kept small for a 2-core laptop)")
    ap.add_argument("--steps-per-epoch", type=int, default=1,
                    help="optimiser steps per epoch (the config's 25 take ~1 h for the full-size backbone on 2 cores)")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    os.environ.setdefault("ANOPLE_ROOT", root)
    weights = args.weights or (TAG if hub_reachable() else "random")
    if weights == "random":
        os.environ["HF_HUB_OFFLINE"] = "1"
        print("=" * 100)
        print("DEMO OFFLINE: no model hub reachable, so the CLIP backbone is RANDOM-INIT. The pipeline runs for")
        print("real, but every score, heatmap and metric below is meaningless for inspection.")
        print("=" * 100)
    print(f"demo: backbone {BACKBONE} ({weights}), 240 px model input, synthetic 128 px images, "
          f"products {', '.join(PRODUCTS)}, 1 shot, {args.epochs} prompt epochs; root {root}")
    t0 = time.time()
    from jobs import evaluate, ingest, promote, score, train  # after HF_HUB_OFFLINE: huggingface_hub reads it on import

    src = make_mvtec_folder(os.path.join(root, "source", "reference"), PRODUCTS, n_train=4, n_test_good=3,
                            n_test_defect=1, size=128, seed=0)
    night = make_mvtec_folder(os.path.join(root, "source", "night"), PRODUCTS, n_train=0, n_test_good=2,
                              n_test_defect=1, size=128, seed=1)
    with open(os.path.join(night, "washer", "test", "good", "truncated.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated upload")  # a broken file, as happens on a real line
    archive, output = os.path.join(root, "archive"), os.path.join(root, "results")
    _step("ingest", ingest.main([src, "--archive", archive, "--deployment", "demo", "--date", "2026-11-21"]))
    for p in PRODUCTS:
        _step("ingest night", ingest.main([os.path.join(night, p, "test"), "--archive", archive,
                                           "--deployment", "demo", "--date", "2026-11-22", "--product", p]))
    _step("train", train.main(["--deployment", "demo", "--archive", archive, "--shots", "1",
                               "--backbone", BACKBONE, "--weights", weights, "--epochs", str(args.epochs),
                               "--steps-per-epoch", str(args.steps_per_epoch)]))
    _step("evaluate", evaluate.main(["--deployment", "demo", "--archive", archive]))
    promote_args = ["--deployment", "demo", "--from-alias", "candidate", "--to", "production"]
    _step("promote", promote.main(promote_args + (["--force"] if weights == "random" else [])))
    _step("score", score.main(["--deployment", "demo", "--archive", archive, "--date", "2026-11-22",
                               "--output", output]))
    from pipeline.registry import tracking_uri  # (imported with the jobs above)
    from pipeline.storage import redact
    print()
    print(f"demo finished in {time.time() - t0:.0f} s ({len(DEFECTS)} defect types per product)")
    print(f"  archive:   {archive}")
    print(f"  scores:    {output}/scores/deployment=demo/date=2026-11-22/scores.parquet  (_SUCCESS names the run)")
    print(f"  heatmaps:  {output}/heatmaps/deployment=demo/date=2026-11-22/run=<run id>/  "
          "(16-bit PNG; value/65535*heatmap_scale, resized to the row's height x width)")
    print(f"  report:    {output}/reports/deployment=demo/date=2026-11-22/report.html  (open it in a browser)")
    print(f"  mlflow:    {redact(tracking_uri())}")
    print(f"  MLflow UI: .venv/bin/mlflow ui --backend-store-uri {redact(tracking_uri())}  -> http://127.0.0.1:5000")
    if weights == "random":
        print("REMINDER: random-init backbone (offline); promoted with --force for the demo only.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
