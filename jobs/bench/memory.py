"""python -m jobs.bench.memory: peak memory of the paths whose memory once grew with their input (issue 23, item 5).
A benchmark: prints figures and ratios, asserts nothing.

Each case runs twice, at a small and a 10x larger input, each in a fresh process that samples its own resident
set (/proc/self/statm, every 5 ms) while the operation runs: the figure is the peak above the resident set at
the operation's start. Bounded memory shows as a large/small ratio near 1, not 10.

  serving  AnoPLePyfunc.predict on a 1,000- and a 10,000-row request (one PNG per row; the tiny random-init
           backbone unless --backbone), the model fitted before the measurement starts
  report   report.build on a 10,000- and a 100,000-row night whose top rows are 3000x3000 JPEGs
  ingest   jobs.ingest of 6 and 60 noise PNGs of 1600x1600 (~7.7 MB each)
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

CASES = {"serving": (1_000, 10_000), "report": (10_000, 100_000), "ingest": (6, 60)}
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Peak:
    """The resident set's peak above its value at entry, sampled by a thread."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())
        self.mb = (self.peak - self.start) / 2**20


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def run_serving(n: int, backbone: str) -> dict:
    import pandas as pd

    from pipeline import serving
    from pipeline.fitting.shots import ProductShots, fit_products
    from pipeline.fitting.weights import build_model
    from pipeline.model.config import AnoPLeConfig
    from pipeline.nightly.scorer import Scorer
    from pipeline.sources.synthetic import normal_image

    model = build_model(backbone, "random", 0, AnoPLeConfig(), "cpu")
    S = model.image_size
    rng = np.random.default_rng(0)
    images = {f"tile/{i}": _png(normal_image("tile", S, rng)) for i in range(3)}
    fit = fit_products(model, {"tile": ProductShots(images, ["tile/0"], ["tile/1", "tile/2"])}, ["tile"], "cpu")
    m = serving.AnoPLePyfunc()
    m.scorer = Scorer.from_fits(model, fit, "cpu")
    one = images["tile/1"]
    frame = pd.DataFrame({"image": [one] * n, "product": ["tile"] * n})  # one bytes object: the input is small
    with Peak() as p:
        out = m.predict(None, frame)
    assert (out["status"] == "ok").all()
    # what decoding every row first held: one float32 [3, S, S] per row
    return {"peak_mb": p.mb, "rows": n, "image_size": S, "decode_all_mb": n * 3 * S * S * 4 / 2**20}


def run_report(n: int) -> dict:
    import pyarrow as pa

    from pipeline import storage
    from pipeline.nightly import nights, report
    from pipeline.nightly.score_table import SCORE_SCHEMA
    from pipeline.sources import archive
    from pipeline.sources.images import encode_heatmap, heatmap_scale

    tmp = tempfile.mkdtemp(prefix="anople-mem-")
    arch, out, date = f"{tmp}/archive", f"{tmp}/out", "2026-11-22"
    rng = np.random.default_rng(0)
    products = np.where(np.arange(n) % 2 == 0, "tile", "washer").astype(object)
    score = rng.uniform(0, 0.9, n)
    ids = np.array([f"img-{i:06d}" for i in range(n)], dtype=object)
    big = rng.integers(0, 255, (3000 // 8, 3000 // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    heat = np.array([None] * n, dtype=object)
    w = archive.ShardWriter(arch, "d", date)
    for p in ("tile", "washer"):
        for i in [i for i in np.argsort(-score) if products[i] == p][:report.TOP_N]:
            w.write({"image_id": ids[i], "product": p, "captured_at": dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc),
                     "image": jpeg, "split": "test", "label": None, "mask": None, "defect": None, "source_uri": None})
            amap = rng.random((64, 64), dtype=np.float32)
            heat[i] = f"{out}/heatmaps/run=r1/{ids[i]}.png"
            storage.write_bytes(heat[i], encode_heatmap(amap, 3000, 3000, heatmap_scale(0.5, amap)))
    w.close()
    table = pa.table({
        "image_id": ids, "product": products, "source_uri": [None] * n, "score": score, "is_anomalous": score > 0.5,
        "threshold": np.full(n, 0.5), "model_name": ["m"] * n, "model_version": ["1"] * n, "heatmap_uri": heat,
        "heatmap_scale": np.full(n, 2.0), "height": np.full(n, 3000, np.int32), "width": np.full(n, 3000, np.int32),
        "status": ["ok"] * n, "error": [None] * n, "run_id": ["r1"] * n,
        "scored_at": pa.array([dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)] * n, type=pa.timestamp("us", tz="UTC"))},
        schema=SCORE_SCHEMA)
    writer = nights.Night(out, "d", date).writer("r1", SCORE_SCHEMA)
    for b in table.to_batches(max_chunksize=4096):
        writer.write(pa.Table.from_batches([b]))
    writer.publish({"model_version": "1", "heatmaps": f"{out}/heatmaps/run=r1", "archive": arch})
    del table, big
    with Peak() as p:
        page, _ = report.build(nights.Night(out, "d", date))
    assert "unavailable" not in page and "unreadable" not in page
    # what holding every top row's full-size decode took: 3000x3000x3 bytes each
    return {"peak_mb": p.mb, "rows": n, "top_rows": 2 * report.TOP_N, "decode_all_mb": 2 * report.TOP_N * 27e6 / 2**20}


def run_ingest(n: int) -> dict:
    from jobs import ingest as ingest_job

    tmp = tempfile.mkdtemp(prefix="anople-mem-")
    src = f"{tmp}/src"
    os.makedirs(src)
    rng = np.random.default_rng(0)
    for i in range(n):
        with open(f"{src}/{i:04d}.png", "wb") as f:
            f.write(_png(rng.integers(0, 255, (1600, 1600, 3), dtype=np.uint8)))
    total = sum(os.path.getsize(f"{src}/{f}") for f in os.listdir(src))
    with Peak() as p:
        rc = ingest_job.main([src, "--archive", f"{tmp}/archive", "--deployment", "d", "--date", "2026-11-22",
                              "--product", "tile"])
    assert rc == 0
    return {"peak_mb": p.mb, "images": n, "source_mb": total / 2**20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="all", choices=["all", *CASES])
    ap.add_argument("--backbone", default="anople-tiny-vit", help="serving's backbone (random init)")
    ap.add_argument("--one", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)  # the child's own run
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        case, n = args.one[0], int(args.one[1])
        res = run_serving(n, args.backbone) if case == "serving" else run_report(n) if case == "report" \
            else run_ingest(n)
        print("RESULT " + json.dumps(res))
        return 0
    print(f"memory bench on {os.cpu_count()} CPUs; peak resident set above the operation's start, one process each")
    for case in CASES if args.case == "all" else [args.case]:
        got = []
        for n in CASES[case]:
            cmd = [sys.executable, "-m", "jobs.bench.memory", "--one", case, str(n), "--backbone", args.backbone]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"memory: {case} {n} failed ({proc.returncode})")
            res = json.loads(line[0][len("RESULT "):])
            got.append(res)
            extra = ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()
                              if k != "peak_mb")
            print(f"  {case:<8} n={n:<7} peak +{res['peak_mb']:8.1f} MB  ({extra}; {time.time() - t0:.0f} s)",
                  flush=True)
        print(f"  {case:<8} ratio large/small input: {got[1]['peak_mb'] / max(got[0]['peak_mb'], 1e-9):.2f} "
              f"(input x{CASES[case][1] / CASES[case][0]:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
