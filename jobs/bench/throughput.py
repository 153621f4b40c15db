"""python -m jobs.bench.throughput: one deployment end to end through the jobs, timed (a benchmark; asserts nothing).

Generates P synthetic products (the base patterns and their colour/scale variants), ingests K normal
shots per product plus held-out normals (for thresholds) and a night of images, then runs the real
jobs in this process: ``jobs.train`` (Ray Train; prints seconds per prompt epoch), ``jobs.promote
--force``, ``jobs.score`` (Ray Data; prints end-to-end images/s, actor start and model load included).
Last, the scorer alone on the same artifact (the actor's inner loop: one visual forward, bank k-NN,
decoder, fusion, blur) on fixed-size batches after a warm-up: steady-state images/s.
The backbone defaults to random init (no hub here), and the output says so.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

from pipeline.model import DEFAULT_BACKBONE


def _check(name: str, rc: int) -> None:
    if rc != 0:
        raise SystemExit(f"throughput: {name} failed with exit code {rc}")


def scorer_rate(deployment: str, batch: int, batches: int) -> dict:
    """Steady-state images/s of Scorer.score on the candidate model, per product round-robin."""
    from pipeline import registry  # (after main() settled HF_HUB_OFFLINE, like the jobs)
    from pipeline.heap import keep_large_blocks_on_heap
    from pipeline.nightly.scorer import Scorer

    keep_large_blocks_on_heap()  # as the scoring actors do

    mv = registry.get_version(deployment, alias="candidate")
    scorer = Scorer.load(registry.artifact_uri(mv), expected_sha256=registry.artifact_sha256(mv))
    S = scorer.model.image_size
    products = sorted(scorer.banks)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 3, S, S)).astype(np.float32)
    names = [products[i % len(products)] for i in range(batch)]
    sync = torch.cuda.synchronize if scorer.device.startswith("cuda") else (lambda: None)
    for _ in range(3):  # warm-up: kernels, allocator, FAISS/torch bank index
        scorer.score(x, names)
    sync()
    t0 = time.perf_counter()
    for _ in range(batches):
        scorer.score(x, names)
    sync()
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        scorer.encode(x)
    sync()
    enc = time.perf_counter() - t0
    n = batch * batches
    return {"device": scorer.device, "images": n, "score_images_per_s": n / full, "encode_images_per_s": n / enc,
            "bank_patches_per_product": int(np.mean([b.n_patches for b in scorer.banks.values()]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.bench.throughput", description=__doc__.split("\n\n")[1])
    ap.add_argument("--products", type=int, default=15)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--night", type=int, default=100, help="night images per product")
    ap.add_argument("--size", type=int, default=256, help="synthetic image side, pixels")
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE)
    ap.add_argument("--weights", default="random")
    ap.add_argument("--batch-size", type=int, default=32, help="scoring batch (job and scorer loop)")
    ap.add_argument("--root", default="", help="working root (default: a temporary folder)")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root or tempfile.mkdtemp(prefix="anople-throughput-"))
    os.environ.setdefault("ANOPLE_ROOT", root)
    if args.weights == "random":
        os.environ["HF_HUB_OFFLINE"] = "1"
        print("NOTE: RANDOM-INIT BACKBONE: timings are real, any score is meaningless.")
    from jobs import ingest, promote, score, train  # after HF_HUB_OFFLINE: huggingface_hub reads it on import
    from pipeline.sources.synthetic import make_mvtec_folder, product_names

    products = product_names(args.products)
    t = {}
    t0 = time.time()
    ref = make_mvtec_folder(os.path.join(root, "source", "reference"), products, n_train=args.shots + 3,
                            n_test_good=0, n_test_defect=0, size=args.size, seed=0)
    night = make_mvtec_folder(os.path.join(root, "source", "night"), products, n_train=0,
                              n_test_good=args.night - args.night // 10, n_test_defect=max(1, args.night // 30),
                              size=args.size, seed=1)
    t["generate"] = time.time() - t0
    archive, output = os.path.join(root, "archive"), os.path.join(root, "results")
    t0 = time.time()
    _check("ingest", ingest.main([ref, "--archive", archive, "--deployment", "bench", "--date", "2026-11-21"]))
    for p in products:
        _check("ingest night", ingest.main([os.path.join(night, p, "test"), "--archive", archive, "--deployment",
                                            "bench", "--date", "2026-11-22", "--product", p]))
    t["ingest"] = time.time() - t0
    t0 = time.time()
    _check("train", train.main(["--deployment", "bench", "--archive", archive, "--shots", str(args.shots),
                                "--backbone", args.backbone, "--weights", args.weights, "--epochs", str(args.epochs)]))
    t["train job"] = time.time() - t0
    print(f"train job: {t['train job']:.1f} s (Ray Train start-up, prompt training, banks and thresholds, "
          "registering)", flush=True)  # said now: a run stopped later keeps it
    _check("promote", promote.main(["--deployment", "bench", "--from-alias", "candidate", "--to", "production",
                                    "--force"]))
    t0 = time.time()
    _check("score", score.main(["--deployment", "bench", "--archive", archive, "--date", "2026-11-22",
                                "--output", output, "--batch-size", str(args.batch_size)]))
    t["score job"] = time.time() - t0
    r = scorer_rate("bench", args.batch_size, batches=10)
    print()
    print(f"deployment: {len(products)} products, {args.shots} shot(s), {args.epochs} epochs, {args.backbone} "
          f"({args.weights}), night {args.night} images/product at {args.size} px")
    for k, v in t.items():
        print(f"  {k:<12} {v:8.1f} s")
    print(f"  scorer loop on {r['device']}: {r['score_images_per_s']:.1f} images/s (batch {args.batch_size}, "
          f"{r['images']} images; bank {r['bank_patches_per_product']} patches/product); visual forward alone "
          f"{r['encode_images_per_s']:.1f} images/s; ratio {r['score_images_per_s'] / r['encode_images_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
