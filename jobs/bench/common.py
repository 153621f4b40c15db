"""What several benchmarks share: the generated products' shots and test rows, one ablation row (fit in
process, then score the test split), `--set` overrides and the table's cells."""
from __future__ import annotations

import os

import numpy as np
import yaml

from pipeline.evaluation.metrics import ProductMetrics, summarize
from pipeline.fitting.learn import learn_and_fit_products
from pipeline.fitting.shots import load_shots
from pipeline.fitting.validation import gain
from pipeline.fitting.weights import build_model
from pipeline.model.config import AnoPLeConfig
from pipeline.nightly.scorer import Scorer
from pipeline.sources import archive
from pipeline.sources.images import decode_image, decode_mask, resize_mask, to_model_input
from pipeline.sources.ingest import ingest


def run_row(clip_args, overrides, train, data, test, products, seed, device):
    """Train (or not) one row's model on the shots (validated on pseudo-anomalies of held-out normals,
    as jobs.train does), fit every product, score the test images. -> (metrics, train seconds, the
    validation gain in points or NaN)."""
    cfg = AnoPLeConfig(**{"seed": seed, **overrides})
    model = build_model(*clip_args, cfg, device)
    S = model.image_size
    learned = learn_and_fit_products(model, data, products, products, device, seed, train=train)
    val_gain = gain(learned.validation)["val_gain_pixel_auroc"] if learned.val_set is not None else float("nan")
    scorer = Scorer.from_fits(model, learned.fits, device)
    per = {}
    for p in products:
        m = ProductMetrics()
        for img, label, mask in test[p]:
            rgb = decode_image(img)
            s, amap = scorer.score(to_model_input(rgb, S)[None], [p])
            m.update(s[0], label, amap[0], resize_mask(decode_mask(mask, rgb.shape[:2]), S))
        per[p] = m.compute()
    # the image score the model deploys (image_score auto: the one its validation chose)
    return summarize(per) | {"image_score": model.cfg.image_score}, learned.train_seconds, val_gain


def load_data(root, products, shots, seed):
    """Ingest the generated products; -> (shots and held-out normals per product, test rows per product)."""
    arch = os.path.join(root, "archive")
    ingest(root + "/src", arch, "bench", "2026-01-01")
    data = load_shots(arch, "bench", list(products), shots, seed)
    t = archive.read_table(arch, "bench", "2026-01-01", archive.Rows(split="test"),
                           columns=["product", "image", "label", "mask"]).to_pylist()
    test = {p: [(r["image"], r["label"], r["mask"]) for r in t if r["product"] == p] for p in products}
    return data, test


def parse_sets(ap, sets: list[str]) -> dict:
    """--set KEY=VALUE ... -> AnoPLe config overrides (values read as YAML)."""
    out = {}
    for kv in sets:
        k, sep, v = kv.partition("=")
        if not sep:
            ap.error(f"--set wants KEY=VALUE, got {kv!r}")
        out[k] = yaml.safe_load(v)
    return out


def cell(values) -> str:
    """mean +- std in %, for a metric over seeds."""
    return f"{100 * np.mean(values):>11.1f} +-{100 * np.std(values):4.1f}"
