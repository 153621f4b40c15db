"""The night's report: one self-contained HTML file per deployment and date, for the quality engineer.

Written by jobs.score after a publish (and logged to its MLflow run), rebuilt by jobs.report. It reads
only what it shows: the published night's small columns (product, status, score) for the counts and
histograms, then, per product, the top-N rows by score (their heatmaps and archived images) and the error
rows (capped). Everything is embedded (inline SVG histograms, JPEG overlays as data URIs), so the file
opens from a local folder, a download from S3 or an MLflow artifact page, with no server.

Overlays use the heatmap's fixed per-product scale (images.heatmap_scale): colour c = LUT(anomaly /
heatmap_scale), so the same colour means the same anomaly on every image of a product; the contour is
where the map crosses the product's threshold.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage
from pipeline.drawing import overlay
from pipeline.errors import NotFoundError
from pipeline.nightly import drift, nights
from pipeline.sources import archive
from pipeline.sources.images import ImageDecodeError, decode_heatmap, decode_scaled

TOP_N = 6          # overlays per product
MAX_ERRORS = 50    # error rows listed per product (the rest counted)
THUMB = 224        # overlay thumbnail long side, pixels
BINS = 40          # histogram bins
def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb_size(height: int, width: int) -> tuple[int, int]:
    """Long side THUMB (small images are enlarged too: every overlay reads at one size)."""
    f = THUMB / max(height, width, 1)
    return max(1, round(height * f)), max(1, round(width * f))


@dataclass
class ProductSection:
    product: str
    scored: int = 0
    anomalous: int = 0
    errors: int = 0
    threshold: float = float("nan")
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    top: list[dict] = field(default_factory=list)       # {image_id, score, uri (data), note}
    error_rows: list[tuple[str, str]] = field(default_factory=list)


def _image_bytes(archive_uri: str | None, deployment: str, date: str, rows: list[dict]) -> tuple[dict, dict]:
    """The encoded images of these rows (one product's top rows): from the archive (row groups holding them only),
    else from their source_uri. -> ({image_id: bytes}, {image_id: why it is missing}). Decoding is the caller's,
    one image at a time."""
    ids = [r["image_id"] for r in rows]
    got: dict[str, bytes] = {}
    why: dict[str, str] = {}
    if archive_uri and ids:
        try:
            got = archive.read_images(archive_uri, deployment, date, ids)
        except Exception as e:  # the archive moved or is unreadable: say so, try each row's source
            why = {i: f"archive unreadable ({type(e).__name__}: {e})" for i in ids}
    for r in rows:
        i = r["image_id"]
        if i in got:
            continue
        try:
            if r.get("source_uri"):
                got[i] = storage.read_bytes(r["source_uri"])
            else:
                why[i] = why.get(i, "no archive recorded and no source_uri")
        except Exception as e:
            why[i] = (f"{why[i]}; " if i in why else "") + f"source unreadable ({type(e).__name__}: {e})"
    return got, why


def _read_rows(pf: pq.ParquetFile, indices: list[int], columns: list[str]) -> pa.Table:
    """Rows at `indices` (file order) of `columns`, reading only the row groups that hold them."""
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    parts = []
    for g in sorted({int(np.searchsorted(starts, i, side="right")) - 1 for i in indices}):
        local = sorted(int(i - starts[g]) for i in indices if starts[g] <= i < starts[g + 1])
        parts.append(pf.read_row_group(g, columns=columns).take(pa.array(local, type=pa.int64())))
    if not parts:
        return pf.schema_arrow.empty_table().select(columns)
    t = pa.concat_tables(parts)
    # back into the order asked for
    found = sorted(indices)
    pos = {i: k for k, i in enumerate(found)}
    return t.take(pa.array([pos[i] for i in indices], type=pa.int64()))


def build(night: nights.Night, top_n: int = TOP_N, operating_points: dict | None = None,
          lineage: str = "") -> tuple[str, dict]:
    """-> (the night's HTML report, a summary {products: {p: counts}, totals}). Raises NotFoundError when the
    night was never published. The night's drift test (pipeline.nightly.drift, written beside the report) is
    shown when there is one; `operating_points` ({product: {"version", "threshold", "kind", "value"}}: another
    version's, e.g. the candidate's) are shown beside the night's, with what each flags on this night."""
    marker = night.published()
    deployment, date = night.deployment, night.date
    if marker is None:
        raise NotFoundError(f"no published night for deployment {deployment!r} on {date} under {night.output}")
    scores_uri = marker["scores"]
    fs, path = storage.arrow_filesystem(scores_uri)
    pf = pq.ParquetFile(fs.open_input_file(path))
    small = pf.read(columns=["product", "status", "score", "is_anomalous", "threshold"])  # the counts' columns
    products = small["product"].fill_null("(no product)")
    prod_all = np.asarray(products.to_pylist(), dtype=object)
    # a row counts as scored when its status is ok AND its score is a finite number: an ok row without one (a
    # foreign writer's row, a bug) is listed with the errors, never drawn, sorted or formatted as a number
    score_all = _floats(small["score"])
    thr_all = _floats(small["threshold"])
    status_ok = pc.fill_null(pc.equal(small["status"], "ok"), False).to_numpy(zero_copy_only=False)
    ok_all = status_ok & np.isfinite(score_all)
    no_score = status_ok & ~ok_all
    anomalous_all = pc.fill_null(small["is_anomalous"], False).to_numpy(zero_copy_only=False)
    sections: dict[str, ProductSection] = {}
    for p in sorted(set(prod_all.tolist())):
        in_p = prod_all == p
        ok = in_p & ok_all
        s = ProductSection(p)
        s.scored = int(ok.sum())
        s.errors = int(in_p.sum()) - s.scored
        s.anomalous = int((ok & anomalous_all).sum())
        s.scores = score_all[ok]
        thr = thr_all[ok & np.isfinite(thr_all)]
        s.threshold = float(thr[0]) if len(thr) else float("nan")
        sections[p] = s
    # top-N rows per product by score, then only those rows' wide columns
    order = np.arange(len(small))
    picks: list[int] = []
    for p in sections:
        idx = order[(prod_all == p) & ok_all]
        picks += idx[np.argsort(-score_all[idx], kind="stable")[:top_n]].tolist()
    err_idx = order[~ok_all]
    wide_cols = ["image_id", "product", "source_uri", "score", "threshold", "heatmap_uri", "heatmap_scale", "height",
                 "width", "error"]
    top = _read_rows(pf, picks, wide_cols).to_pylist()
    for p in sections:  # product by product, one image decoded at a time (at thumbnail scale where the format can)
        rows = [r for r in top if r["product"] == p]
        encoded, missing = _image_bytes(marker.get("archive"), deployment, date, rows)
        for r in rows:
            item = {"image_id": r["image_id"], "score": r["score"], "note": ""}
            try:
                h, w = _thumb_size(r["height"] or THUMB, r["width"] or THUMB)
                amap = decode_heatmap(storage.read_bytes(r["heatmap_uri"]), r["heatmap_scale"], size=(h, w))
                data = encoded.pop(r["image_id"], None)
                rgb = None
                if data is None:
                    item["note"] = f"image unavailable, heatmap only: {missing.get(r['image_id'], '')}"
                else:
                    try:
                        small_rgb, _ = decode_scaled(data, THUMB)
                        rgb = np.asarray(Image.fromarray(small_rgb).resize((w, h), Image.BILINEAR))
                    except ImageDecodeError as e:
                        item["note"] = f"image unavailable, heatmap only: {e}"
                    del data
                item["uri"] = _data_uri(overlay(rgb, amap, r["heatmap_scale"], r["threshold"]))
            except Exception as e:  # one unreadable heatmap leaves a named gap, never a missing report
                item["uri"], item["note"] = "", f"heatmap unreadable: {type(e).__name__}: {e}"
            sections[p].top.append(item)
    shown, kept = [], {p: 0 for p in sections}  # at most MAX_ERRORS per product: read only those
    for i in err_idx.tolist():
        if kept[prod_all[i]] < MAX_ERRORS:
            kept[prod_all[i]] += 1
            shown.append(i)
    errs = _read_rows(pf, shown, ["product", "image_id", "error"])
    for k, p, i, e in zip(shown, errs["product"].fill_null("(no product)").to_pylist(), errs["image_id"].to_pylist(),
                          errs["error"].to_pylist()):
        if len(sections[p].error_rows) < MAX_ERRORS:
            why = "status ok but no finite score" if no_score[k] else e or ""
            sections[p].error_rows.append((i if i is not None else "(no image_id)", why))
    summary = {"deployment": deployment, "date": date, "run_id": marker.get("run_id"),
               "model_version": marker.get("model_version"), "rows": len(small),
               "products": {p: {"scored": s.scored, "anomalous": s.anomalous, "error": s.errors}
                            for p, s in sections.items()}}
    found = drift.read_result(night)
    if found is not None:
        summary["drift_flagged"] = found.get("flagged", [])
    points = {}
    for p, op in (operating_points or {}).items():
        if p in sections:
            sc = sections[p].scores
            points[p] = op | {"threshold_now": sections[p].threshold, "flags_new": int((sc > op["threshold"]).sum()),
                              "flags_now": int((sc > sections[p].threshold).sum())}
    if points:
        summary["operating_points"] = points
    summary["lineage"] = lineage
    return _html(summary, sections, marker, top_n, found, points), summary


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as float64 with nulls as NaN."""
    return np.asarray(pc.cast(column, pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)


def write(night: nights.Night, top_n: int = TOP_N, operating_points: dict | None = None,
          lineage: str = "") -> tuple[str, dict]:
    """Build the report and write it beside the night (Night.report_uri). -> (its URI, summary)."""
    page, summary = build(night, top_n, operating_points, lineage)
    storage.write_bytes(night.report_uri, page.encode())
    return night.report_uri, summary


def _histogram_svg(scores: np.ndarray, threshold: float, width: int = 360, height: int = 110) -> str:
    """Inline SVG histogram of the product's scores, the threshold as a red line."""
    if scores.size == 0:
        return "<p class=muted>no scored images</p>"
    lo = float(min(scores.min(), threshold if np.isfinite(threshold) else scores.min()))
    hi = float(max(scores.max(), threshold if np.isfinite(threshold) else scores.max()))
    if hi <= lo:
        hi = lo + 1e-6
    counts, edges = np.histogram(scores, bins=BINS, range=(lo, hi))
    top = max(int(counts.max()), 1)
    bw = width / BINS
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - 14 - c / top * (height - 20):.1f}" width="{bw - 1:.1f}" '
        f'height="{c / top * (height - 20):.1f}" fill="{"#c0392b" if edges[i] >= threshold else "#5d6d7e"}"/>'
        for i, c in enumerate(counts) if c)
    tx = (threshold - lo) / (hi - lo) * width if np.isfinite(threshold) else -10
    return (f'<svg class=hist width="{width}" height="{height}" role="img" aria-label="score histogram">{bars}'
            f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="0" y2="{height - 14}" stroke="#e74c3c" stroke-width="2"/>'
            f'<text x="0" y="{height - 2}" font-size="10">{lo:.3g}</text>'
            f'<text x="{width}" y="{height - 2}" font-size="10" text-anchor="end">{hi:.3g}</text>'
            f'<text x="{min(max(tx + 3, 0), width - 80):.1f}" y="10" font-size="10" fill="#e74c3c">threshold {threshold:.3g}</text>'
            "</svg>")


def _drift_html(found: dict | None) -> str:
    """The drift table: per product and test, the statistic against its threshold; flagged rows in red."""
    if found is None:
        return ""
    e = html.escape
    rows = []
    for p, r in sorted(found["products"].items()):
        for t in r["tests"]:
            stat = "-" if t["statistic"] is None else f"{t['statistic']:.3f}"
            pv = "-" if t.get("p_value") is None else f"{t['p_value']:.2g}"
            rows.append(f'<tr class="{"flag" if t["flagged"] else ""}" data-product="{e(p)}" data-test="{e(t["test"])}">'
                        f'<td>{e(p)}</td><td>{e(t["test"])}</td><td>{e(t["baseline"])}</td>'
                        f'<td class=n>{t["n"]}</td><td class=n>{t.get("n_baseline", "-")}</td><td class=n>{stat}</td>'
                        f'<td class=n>{pv}</td><td>{e(t["threshold"])}</td>'
                        f'<td>{"DRIFT" if t["flagged"] else e(t.get("note", "ok"))}</td></tr>')
    head = (f'<p class="drift-flag">Drift flagged: {e(", ".join(found["flagged"]))}</p>' if found["flagged"]
            else '<p class=muted>No product drifted.</p>')
    return (f'<section id=drift><h2>Drift</h2>{head}<p class=muted>Scores of presumed-normal images (scored ok, not '
            f'flagged) against the version\'s calibration normals and the trailing nights of the same version.</p>'
            f'<table id=drift-table><tr><th>product</th><th>test</th><th>baseline</th><th>n</th><th>n baseline</th>'
            f'<th>statistic</th><th>p</th><th>flag when</th><th>result</th></tr>{"".join(rows)}</table></section>')


def _points_html(points: dict) -> str:
    if not points:
        return ""
    e = html.escape
    rows = "".join(
        f'<tr data-product="{e(p)}"><td>{e(p)}</td><td class=n>{op["threshold_now"]:.4g}</td><td class=n>{op["flags_now"]}</td>'
        f'<td>version {e(str(op["version"]))}: {e(op["how"])}</td><td class=n>{op["threshold"]:.4g}</td>'
        f'<td class=n>{op["flags_new"]}</td></tr>' for p, op in sorted(points.items()))
    return ('<section id=operating-points><h2>Operating points awaiting promotion</h2><p class=muted>The night\'s '
            'thresholds beside those of a newer version, with what each flags on this night.</p>'
            '<table><tr><th>product</th><th>threshold now</th><th>flagged now</th><th>new operating point</th>'
            f'<th>new threshold</th><th>would flag</th></tr>{rows}</table></section>')


def _html(summary: dict, sections: dict[str, ProductSection], marker: dict, top_n: int, found: dict | None = None,
          points: dict | None = None) -> str:
    e = html.escape
    flagged = set((found or {}).get("flagged", []))
    rows = "".join(
        f'<tr><td><a href="#p-{e(p)}">{e(p)}</a></td><td class=n data-k="scored">{s.scored}</td>'
        f'<td class=n data-k="anomalous">{s.anomalous}</td><td class=n data-k="error">{s.errors}</td>'
        f'<td class=n>{f"{s.threshold:.4g}" if np.isfinite(s.threshold) else "-"}</td>'
        f'<td class="{"flag" if p in flagged else ""}">{"DRIFT" if p in flagged else ("ok" if found else "-")}</td></tr>'
        for p, s in sections.items())
    tot = {k: sum(v[k] for v in summary["products"].values()) for k in ("scored", "anomalous", "error")}
    parts = []
    for p, s in sections.items():
        cards = "".join(
            f'<figure class=ov><img alt="{e(t["image_id"])}" src="{t["uri"]}"/>'
            f'<figcaption>{e(t["image_id"])}<br>score {t["score"]:.4g}'
            f'{" &middot; " + e(t["note"]) if t["note"] else ""}</figcaption></figure>'
            if t["uri"] else f'<figure class=ov><figcaption>{e(t["image_id"])}: {e(t["note"])}</figcaption></figure>'
            for t in s.top)
        errs = "".join(f"<tr><td>{e(i)}</td><td>{e(m)}</td></tr>" for i, m in s.error_rows)
        more = s.errors - len(s.error_rows)
        words = (marker.get("class_names") or {}).get(p)
        parts.append(
            f'<section id="p-{e(p)}" data-product="{e(p)}"><h2>{e(p)}</h2>'
            + (f'<p class="muted class-name">its prompts say &ldquo;{e(words)}&rdquo;</p>' if words else "") +
            f'<p>{s.scored} scored, {s.anomalous} anomalous, {s.errors} error</p>'
            f'{_histogram_svg(s.scores, s.threshold)}'
            + (f'<h3>Top {len(s.top)} by score</h3><div class=grid>{cards}</div>' if s.top else "")
            + (f'<h3>Error rows</h3><table class=err><tr><th>image_id</th><th>reason</th></tr>{errs}</table>'
               + (f"<p class=muted>and {more} more error rows (see the night's scores)</p>" if more > 0 else "")
               if s.error_rows else "")
            + "</section>")
    built = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>AnoPLe night {e(summary["deployment"])} {e(summary["date"])}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#1b2631}} table{{border-collapse:collapse}}
td,th{{border:1px solid #d5d8dc;padding:3px 8px}} td.n{{text-align:right}} .muted{{color:#7f8c8d}}
.grid{{display:flex;flex-wrap:wrap;gap:12px}} figure.ov{{margin:0;font-size:12px;max-width:460px}}
figure.ov img{{display:block;max-width:460px}} section{{margin-top:28px;border-top:2px solid #eaecee}}
table.err td{{font-size:12px}} .flag{{background:#fdecea;color:#922b21;font-weight:600}}
.drift-flag{{color:#922b21;font-weight:600}}
</style></head><body>
<h1>Night of {e(summary["date"])} &middot; deployment {e(summary["deployment"])}</h1>
<p class=muted>model version {e(str(marker.get("model_version")))}{
  f' (<span class=lineage>{e(summary["lineage"])}</span>)' if summary.get("lineage") else ""}, run {e(str(marker.get("run_id")))},
published {e(str(marker.get("published_at")))}; report built {built}. Image score:
{e(str(marker.get("image_score", "map")))}. Overlays: the image, then the heatmap
in colour on the product's fixed scale (4 x threshold = brightest) with the threshold's contour in cyan.</p>
<table id=summary><tr><th>product</th><th>scored</th><th>anomalous</th><th>error</th><th>threshold</th><th>drift</th></tr>{rows}
<tr><th>total</th><td class=n data-k="scored">{tot["scored"]}</td><td class=n data-k="anomalous">{tot["anomalous"]}</td>
<td class=n data-k="error">{tot["error"]}</td><td></td><td></td></tr></table>
{_drift_html(found)}
{_points_html(points or {})}
{"".join(parts)}
<script>
// record which overlays loaded (read back by tests and by anyone who opens the DOM)
window.addEventListener("load", () => {{
  const imgs = [...document.querySelectorAll("figure.ov img")];
  imgs.forEach(i => i.dataset.loaded = (i.complete && i.naturalWidth > 0) ? "1" : "0");
  document.body.dataset.overlaysLoaded = imgs.filter(i => i.dataset.loaded === "1").length;
}});
</script>
</body></html>
"""
