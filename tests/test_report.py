"""The night's HTML report, rendered by a real headless Chromium: counts, histograms, overlays that load,
error rows; a 100k-row night reads only what it shows."""
import datetime as dt
import io
import os
import re

import numpy as np
import pyarrow as pa
from PIL import Image

from jobs import report as report_job
from pipeline import drawing, storage
from pipeline.nightly import nights, report
from pipeline.nightly.score_table import SCORE_SCHEMA
from pipeline.sources import archive
from pipeline.sources.images import encode_heatmap, heatmap_scale
from pipeline.sources.synthetic import add_defect, normal_image
from tests.browser import dump_dom, screenshot

DATE = "2026-11-22"
TOP = 3


def _png(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _night(tmp_path, n_rows):
    """A published night of n_rows rows over tile/washer, plus error rows (unknown product 'gear', a row with no
    product, more washer errors than the report lists). Only the top rows by score have heatmaps and archived
    images: a report that touched any other row would show a gap."""
    arch, out = str(tmp_path / "archive"), str(tmp_path / "out")
    rng = np.random.default_rng(0)
    n_err = 80
    products = np.where(np.arange(n_rows) % 2 == 0, "tile", "washer").astype(object)
    score = rng.uniform(0.0, 0.9, n_rows)
    status = np.array(["ok"] * n_rows, dtype=object)
    error = np.array([""] * n_rows, dtype=object)
    status[1:2 * n_err:2], error[1:2 * n_err:2] = "error", "cannot decode image: truncated"  # washer rows
    score[status == "error"] = np.nan
    products[2 * n_err + 1], status[2 * n_err + 1], error[2 * n_err + 1] = "gear", "error", "unknown product 'gear'"
    products[2 * n_err + 3], status[2 * n_err + 3], error[2 * n_err + 3] = None, "error", "row has no product"
    score[[2 * n_err + 1, 2 * n_err + 3]] = np.nan
    ids = np.array([f"img-{i:06d}" for i in range(n_rows)], dtype=object)
    thr = np.full(n_rows, 0.5)
    top = {p: [i for i in np.argsort(-np.nan_to_num(score, nan=-1)) if products[i] == p][:TOP] for p in ("tile", "washer")}
    w = archive.ShardWriter(arch, "d", DATE)
    heat_uri = np.array([f"{out}/heatmaps/missing/{i}.png" for i in ids], dtype=object)  # never written
    for p, idx in top.items():
        for i in idx:
            rgb, mask = add_defect(normal_image(p, 64, rng), "scratch", rng)
            w.write({"image_id": ids[i], "product": p, "captured_at": dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc),
                     "image": _png(rgb), "split": "test", "label": None, "mask": None, "defect": None,
                     "source_uri": None})
            amap = mask.astype(np.float32) * 1.5 + 0.1
            heat_uri[i] = f"{out}/heatmaps/run=r1/{ids[i]}.png"
            storage.write_bytes(heat_uri[i], encode_heatmap(amap, 64, 64, heatmap_scale(0.5, amap), side=32))
    w.close()
    ok = status == "ok"
    table = pa.table({
        "image_id": ids, "product": products, "source_uri": [None] * n_rows, "score": score,
        "is_anomalous": ok & (np.nan_to_num(score) > thr), "threshold": thr,
        "model_name": ["anople-d"] * n_rows, "model_version": ["3"] * n_rows,
        "heatmap_uri": np.where(ok, heat_uri, None), "heatmap_scale": np.where(ok, 2.0, np.nan),
        "height": np.where(ok, 64, 0).astype(np.int32), "width": np.where(ok, 64, 0).astype(np.int32),
        "status": status, "error": np.where(ok, None, error), "run_id": ["r1"] * n_rows,
        "scored_at": pa.array([dt.datetime(2026, 11, 22, 3, tzinfo=dt.timezone.utc)] * n_rows,
                              type=pa.timestamp("us", tz="UTC"))}, schema=SCORE_SCHEMA)
    writer = nights.Night(out, "d", DATE).writer("r1", SCORE_SCHEMA)
    for b in table.to_batches(max_chunksize=4096):  # row groups, as a streamed night writes them
        writer.write(pa.Table.from_batches([b]))
    writer.publish({"model_version": "3", "heatmaps": f"{out}/heatmaps/run=r1", "archive": arch,
                    "class_names": {"tile": "ceramic tile", "washer": "washer"}, "image_score": "global_bank"})
    expect = {}
    for p in ("tile", "washer", "gear", "(no product)"):
        sel = np.array([(q if q is not None else "(no product)") == p for q in products])
        expect[p] = {"scored": int((sel & ok).sum()), "anomalous": int((sel & ok & (np.nan_to_num(score) > thr)).sum()),
                     "error": int((sel & ~ok).sum())}
    return out, expect


def _summary_counts(dom):
    rows = re.findall(r'<tr><td><a href="#p-[^"]*">([^<]*)</a></td>(.*?)</tr>', dom)
    return {p: {k: int(v) for k, v in re.findall(r'data-k="(\w+)">(\d+)<', cells)} for p, cells in rows}


def test_a_100k_row_night_renders_in_chromium_with_counts_overlays_and_errors(tmp_path, capsys):
    out, expect = _night(tmp_path, 100_000)
    assert report_job.main(["--deployment", "d", "--date", DATE, "--output", out, "--top", str(TOP)]) == 0
    uri = nights.Night(out, "d", DATE).report_uri
    assert f"report: {uri}" in capsys.readouterr().out
    assert os.path.getsize(uri) < 1_000_000  # overlays of the top rows only, not 100k rows
    dom = dump_dom(uri)
    assert _summary_counts(dom) == expect
    for p in expect:
        assert f'data-product="{p}"' in dom
    # the top rows' overlays (image | heatmap with contour) are images that loaded in the browser
    assert len(re.findall(r'<img [^>]*data-loaded="1"', dom)) == 2 * TOP
    assert 'data-overlays-loaded="6"' in dom
    assert "unavailable" not in dom and "unreadable" not in dom
    # the words each product's prompts use, and the image score the model deploys
    assert re.search(r'data-product="tile">.*?class-name">its prompts say .ceramic tile.</p>', dom, re.S)
    assert "Image score:\nglobal_bank" in dom
    assert dom.count("<svg class=\"hist\"") == 2  # one histogram per product with scored rows
    # error rows with their reasons, capped per product
    assert "unknown product 'gear'" in dom and "row has no product" in dom
    assert f"and {80 - report.MAX_ERRORS} more error rows" in dom
    png = screenshot(uri, str(tmp_path / "report.png"))
    shot = np.asarray(Image.open(png).convert("RGB"))
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 200  # not blank: text and overlays


def test_no_published_night_is_a_usage_error(tmp_path, capsys):
    assert report_job.main(["--deployment", "d", "--date", DATE, "--output", str(tmp_path)]) == 2
    assert "no published night" in capsys.readouterr().err


def test_overlay_draws_the_threshold_contour_on_the_fixed_scale():
    amap = np.zeros((20, 20), np.float32)
    amap[5:15, 5:15] = 1.0
    pair = np.asarray(overlay := drawing.overlay(np.full((20, 20, 3), 128, np.uint8), amap, 2.0, 0.5))
    assert overlay.size == (44, 20)
    right = pair[:, 24:]
    assert (right[5, 5:15] == (0, 255, 255)).all() and not (right[10, 10] == (0, 255, 255)).all()
    assert (pair[:, :20] == 128).all()  # the image itself, untouched


def test_ok_rows_without_a_score_or_threshold_do_not_break_the_report(tmp_path):
    """A night another writer touched: ok rows with a null or NaN score and null thresholds. The report is built,
    those rows are listed with the errors (never drawn or sorted as numbers), the rest count as scored."""
    out = str(tmp_path / "out")
    n = 8
    score = pa.array([0.2, None, 0.4, float("nan"), 0.9, 0.1, None, 0.3], type=pa.float64())
    thr = pa.array([None, None, 0.5, 0.5, None, 0.5, 0.5, None], type=pa.float64())
    table = pa.table({
        "image_id": [f"i{k}" for k in range(n)], "product": ["tile"] * n, "source_uri": [None] * n, "score": score,
        "is_anomalous": [False, None, False, False, True, False, None, False], "threshold": thr,
        "model_name": ["anople-d"] * n, "model_version": ["3"] * n, "heatmap_uri": [None] * n,
        "heatmap_scale": [None] * n, "height": [64] * n, "width": [64] * n, "status": ["ok"] * n, "error": [None] * n,
        "run_id": ["r1"] * n, "scored_at": pa.array([dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)] * n,
                                                    type=pa.timestamp("us", tz="UTC"))}, schema=SCORE_SCHEMA)
    writer = nights.Night(out, "d", DATE).writer("r1", SCORE_SCHEMA)
    writer.write(table)
    writer.publish({"model_version": "3", "heatmaps": f"{out}/heatmaps/run=r1", "archive": None})
    page, summary = report.build(nights.Night(out, "d", DATE))
    assert summary["products"]["tile"] == {"scored": 5, "anomalous": 1, "error": 3}
    assert page.count("status ok but no finite score") == 3 and "threshold 0.5" in page
