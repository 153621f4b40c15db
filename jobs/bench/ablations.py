"""python -m jobs.bench.ablations: the paper's ablation table on the project's synthetic products.

Benchmark, not a test: for each seed it generates products with exact defect masks, then for each row
trains AnoPLe (the real model, trainer, bank fitting and scorer, in-process without Ray) on K normal
shots and scores the held-out test split, whose defects (scratches, stains, holes) are never seen in
training (pseudo-anomalies are pasted / noised / texture blobs, or boxes with pseudo_shape "box"). Prints mean +- std over seeds of
I-AUROC, P-AUROC and AUPRO (FPR 0.3), in %. With a random-init backbone the absolute numbers are not
the paper's; what it shows is whether each part learns (vs. the untrained model) and how they compare.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np
import torch

from jobs.bench.common import cell, load_data, parse_sets, run_row
from pipeline.evaluation.metrics import PAPER_METRICS
from pipeline.model.config import LEGACY_WIRING, AnoPLeConfig
from pipeline.sources.synthetic import make_mvtec_folder

ROWS = [  # (row name, AnoPLeConfig overrides, train?); the full model is the config's defaults
    ("untrained (T<->I, 0 steps)", {}, False),
    ("text only", {"prompt_mode": "text"}, True),
    ("visual only", {"prompt_mode": "visual"}, True),
    ("T->I only", {"prompt_mode": "t2i"}, True),
    ("I->T only", {"prompt_mode": "i2t"}, True),
    ("T<->I (full AnoPLe, default)", {}, True),
    ("T<->I, no L_align", {"use_align_loss": False}, True),
    ("T<->I, no multi-scale/prefix", {"multiscale": False, "use_prefix": False}, True),
    ("T<->I, weighted fusion (w on validation)", {"fusion": "weighted"}, True),
    ("T<->I, calibrated harmonic fusion", {"fusion": "harmonic", "fusion_calibrated": True}, True),
    ("T<->I, text/decoder map only", {"fusion": "text"}, True),
    ("untrained, text/decoder map only", {"fusion": "text"}, False),
    ("memory bank only", {"prompt_mode": "none", "fusion": "bank"}, False),
    # the wiring (issue 22): each choice's earlier value, one at a time, then all of them (the model before)
    ("T<->I, image score = map max", {"image_score": "map"}, True),
    ("T<->I, image score = z0 x bank (PromptAD)", {"image_score": "global_bank"}, True),
    ("T<->I, image score = z0 x map", {"image_score": "global_map"}, True),
    ("T<->I, crops of a 2x upsample", {"crop_source": "upsample"}, True),
    ("T<->I, random [abnormal] init", {"abnormal_init": "random"}, True),
    ("T<->I, q-k patch tokens (no v-v path)", {"patch_path": "qk"}, True),
    ("T<->I, bank on prompted tokens", {"bank_source": "prompted"}, True),
    ("T<->I, box pseudo-anomalies", {"pseudo_shape": "box"}, True),
    ("T<->I, legacy L_align pooling", {"align_pool": "linear"}, True),
    ("T<->I, all the earlier wiring", dict(LEGACY_WIRING), True),
]


def print_table(rows, results: dict, times: dict, gains: dict) -> None:
    print()
    head = (f"{'ablation':<42}" + "".join(f"{k:>18}" for k in ("I-AUROC", "P-AUROC", "AUPRO"))
            + f"{'val gain':>10}{'train s':>9}{'n':>4}")
    print(head)
    print("-" * len(head))
    for name, _, _ in rows:
        rs = results.get(name, [])
        if not rs:
            continue
        g = [x for x in gains.get(name, []) if np.isfinite(x)]
        print(f"{name:<42}" + "".join(cell([r[k] for r in rs]) for k in PAPER_METRICS)
              + (f"{np.mean(g):>+10.1f}" if g else f"{'-':>10}") + f"{np.mean(times[name]):>9.1f}{len(rs):>4}")


def merge(paths: list[str]) -> int:
    """One table from several --json files (e.g. seeds run in separate sessions)."""
    results, times, gains = {}, {}, {}
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        for name, rs in d["results"].items():
            results.setdefault(name, []).extend(rs)
            times.setdefault(name, []).extend(d["train_s"][name])
            gains.setdefault(name, []).extend(d.get("val_gain", {}).get(name, []))
    print_table(ROWS, results, times, gains)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.bench.ablations", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="anople-small-vit")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--products", default="tile,washer,fabric,pill,grid")
    ap.add_argument("--size", type=int, default=128, help="synthetic image size")
    ap.add_argument("--rows", default="", help="comma-separated row numbers to run (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="AnoPLe config override for every row (repeatable), e.g. --set optimizer=sgd; "
                         "default: the config's defaults, as jobs.train uses them")
    ap.add_argument("--json", default="", help="also write every (seed, row) result to this JSON file")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only print one table from earlier --json files")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge)
    common = parse_sets(ap, args.set)
    products = args.products.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.weights == "random":
        print("NOTE: random-init backbone: absolute numbers are not the paper's.")
    print(f"backbone {args.backbone} ({args.weights}), {args.shots} shot(s), config {AnoPLeConfig(**common).to_dict()}, "
          f"seeds {seeds}, products {', '.join(products)}, device {device}")
    results = {name: [] for name, _, _ in rows}
    times = {name: [] for name, _, _ in rows}
    gains = {name: [] for name, _, _ in rows}
    for seed in seeds:
        with tempfile.TemporaryDirectory() as root:
            make_mvtec_folder(root + "/src", tuple(products), n_train=args.shots + 4, n_test_good=6,
                              n_test_defect=2, size=args.size, seed=100 + seed)
            data, test = load_data(root, products, args.shots, seed)
            for name, overrides, train in rows:
                r, t, g = run_row((args.backbone, args.weights, seed), {**common, **overrides},
                                  train, data, test, products, seed, device)
                results[name].append(r)
                times[name].append(t)
                gains[name].append(g)
                if args.json:  # after every row: a run cut short keeps what it finished
                    with open(args.json, "w") as f:
                        json.dump({"args": vars(args), "results": results, "train_s": times, "val_gain": gains},
                                  f, indent=1)
                print(f"  seed {seed} {name:<40}" + "".join(f" {k} {100 * r[k]:5.1f}" for k in PAPER_METRICS)
                      + f"  val gain {g:+.1f}  image score {r['image_score']}  (train {t:.1f}s)", flush=True)
    print_table(rows, results, times, gains)
    return 0


if __name__ == "__main__":
    sys.exit(main())
