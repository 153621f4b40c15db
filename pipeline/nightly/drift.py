"""Drift: is a product's night unlike its normal past? Caught the night it starts.

Each published night records, per product, a sample of the scores of its *presumed-normal* images (scored ok, not
flagged) in `reports/deployment=D/date=X/score_distributions.json` (at most SAMPLE_MAX scores, a seeded subsample
past that). The night is tested per product against two baselines:

- ``calibration``: the product's normal calibration scores in the scoring version (fits/<product>.json: the
  held-out train normals, or the shots' leave-one-out scores, behind its threshold);
- ``trailing``: the presumed-normal scores of up to TRAILING_NIGHTS earlier nights under the same output, scored
  by the same model version (another version's scores are on another scale), once there is at least one.

The test is the two-sample Kolmogorov-Smirnov test (scipy.stats.ks_2samp, two-sided): statistic D, the largest
gap between the two empirical score distributions, and its p-value. A product is flagged when p < ALPHA *and*
D >= D_MIN: a millions-of-images night makes any tiny shift "significant", D_MIN keeps the flag for shifts a
quality engineer would care about. A shift so strong that most of the night is flagged leaves few presumed
normals, so the alarm rate is tested too: flagged when over ALARM_RATE_MAX of at least MIN_ROWS scored images
alarm (the fit's thresholds let no calibration normal alarm).
"""
from __future__ import annotations

import json
import math

import numpy as np

from pipeline import storage

ALPHA = 1e-3          # KS p-value below which a distribution counts as shifted ...
D_MIN = 0.3           # ... when its KS statistic is at least this
ALARM_RATE_MAX = 0.5  # share of a product's scored images alarming that counts as drift by itself
MIN_ROWS = 8          # fewer presumed-normal (or scored) images than this: not tested
TRAILING_NIGHTS = 7   # earlier nights in the trailing baseline
SAMPLE_MAX = 2000     # presumed-normal scores recorded per product and night
DISTRIBUTIONS = "score_distributions.json"


def distributions_uri(night) -> str:
    """Beside the night's report: reports/deployment=D/date=X/score_distributions.json."""
    return storage.join(night.report_uri.rsplit("/", 1)[0], DISTRIBUTIONS)


def record(night, model_version: str, products: np.ndarray, scores: np.ndarray, ok: np.ndarray,
           anomalous: np.ndarray) -> dict:
    """Per product: n scored, n alarming, and a sample of presumed-normal scores; written beside the report."""
    rng = np.random.default_rng(0)
    out = {"model_version": str(model_version), "date": night.date, "products": {}}
    for p in sorted(set(products[ok].tolist())):
        mine = ok & (products == p)
        normal = np.sort(scores[mine & ~anomalous])
        sample = normal if len(normal) <= SAMPLE_MAX else np.sort(rng.choice(normal, SAMPLE_MAX, replace=False))
        out["products"][p] = {"scored": int(mine.sum()), "alarms": int((mine & anomalous).sum()),
                              "presumed_normal": int(len(normal)), "scores": [round(float(x), 7) for x in sample]}
    storage.write_bytes(distributions_uri(night), json.dumps(out).encode())
    return out


def trailing(night, model_version: str, n: int = TRAILING_NIGHTS) -> dict[str, list[float]]:
    """product -> presumed-normal scores of up to `n` published nights before this one with the same version."""
    root = night.report_uri.rsplit("/", 2)[0]  # reports/deployment=D
    try:
        files = storage.list_files(root)
    except FileNotFoundError:
        return {}
    dates = sorted({u[len(root):].lstrip("/").split("/")[0][len("date="):] for u in files
                    if u.endswith("/" + DISTRIBUTIONS)})
    earlier = [d for d in dates if d < night.date][-n:]
    pooled: dict[str, list[float]] = {}
    for d in earlier:
        try:
            rec = json.loads(storage.read_bytes(storage.join(root, f"date={d}", DISTRIBUTIONS)))
        except (FileNotFoundError, ValueError):
            continue
        if rec.get("model_version") != str(model_version):
            continue
        for p, v in rec.get("products", {}).items():
            pooled.setdefault(p, []).extend(v.get("scores", []))
    return pooled


def ks(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> tuple[float, float]:
    """Two-sample, two-sided KS: (statistic D, p-value)."""
    from scipy.stats import ks_2samp
    r = ks_2samp(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return float(r.statistic), float(r.pvalue)


def test_night(dist: dict, calibration: dict[str, list[float]], trail: dict[str, list[float]]) -> dict:
    """-> {product: {"flagged": bool, "tests": [{baseline, test, n, n_baseline, statistic, p_value, threshold,
    flagged} ...]}} for every product of the night (`dist` from `record`)."""
    out = {}
    for p, d in dist["products"].items():
        night_scores = d["scores"]
        tests = []
        for name, base in (("calibration", calibration.get(p) or []), ("trailing", trail.get(p) or [])):
            t = {"baseline": name, "test": "ks_2samp", "n": len(night_scores), "n_baseline": len(base),
                 "threshold": f"p < {ALPHA:g} and D >= {D_MIN:g}"}
            if len(night_scores) < MIN_ROWS or len(base) < 2:
                t.update(statistic=None, p_value=None, flagged=False,
                         note=f"not tested: {len(night_scores)} presumed-normal images (needs {MIN_ROWS}), "
                              f"{len(base)} baseline scores (needs 2)")
            else:
                stat, pv = ks(night_scores, base)
                t.update(statistic=round(stat, 4), p_value=float(f"{pv:.3g}"), flagged=bool(pv < ALPHA and stat >= D_MIN))
            tests.append(t)
        rate = d["alarms"] / d["scored"] if d["scored"] else 0.0
        tests.append({"baseline": "calibration", "test": "alarm_rate", "n": d["scored"], "statistic": round(rate, 4),
                      "p_value": None, "threshold": f"> {ALARM_RATE_MAX:g} of >= {MIN_ROWS} scored",
                      "flagged": bool(d["scored"] >= MIN_ROWS and rate > ALARM_RATE_MAX)})
        out[p] = {"flagged": any(t["flagged"] for t in tests), "tests": tests}
    return out


def describe(result: dict) -> list[str]:
    """One line per flagged product: which test said so, its statistic and threshold."""
    lines = []
    for p, r in sorted(result.items()):
        if not r["flagged"]:
            continue
        why = "; ".join(
            f"{t['test']} vs {t['baseline']}: " + (f"D={t['statistic']:.3f}, p={t['p_value']:.2g}"
                                                   if t["test"] == "ks_2samp" else f"rate={t['statistic']:.2f}")
            + f" ({t['threshold']})" for t in r["tests"] if t["flagged"])
        lines.append(f"{p}: {why}")
    return lines


def metrics(result: dict, key) -> dict[str, float]:
    """MLflow metrics: drift.<test>.<baseline>.<product> statistics and drift.flagged.<product>."""
    m = {}
    for p, r in result.items():
        m[f"drift.flagged.{key(p)}"] = float(r["flagged"])
        for t in r["tests"]:
            if t["statistic"] is not None and math.isfinite(t["statistic"]):
                m[f"drift.{t['test']}.{t['baseline']}.{key(p)}"] = float(t["statistic"])
    return m


RESULT = "drift.json"


def result_uri(night) -> str:
    return storage.join(night.report_uri.rsplit("/", 1)[0], RESULT)


def calibration_of(files, products) -> dict[str, list[float]]:
    """product -> its normal calibration scores from the version's fits/<product>.json ([] when it has none)."""
    from pipeline import artifact
    out = {}
    for p in products:
        try:
            out[p] = [float(x) for x in json.loads(files.read(artifact.fit_file(p))).get("calibration_scores", [])]
        except (FileNotFoundError, artifact.ModelRefused, ValueError):
            out[p] = []
    return out


def assess(night, model_version: str, files) -> dict:
    """Record the published night's presumed-normal score distributions, test each product against its
    baselines (calibration scores from the version's artifact `files`, an artifact.Files), write the result beside
    the report (drift.json, which the report shows). -> the result:
    {"model_version", "products": {p: {"flagged", "tests"}}, "flagged": [p ...], "lines": [...], "settings"}."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    marker = night.published()
    fs, path = storage.arrow_filesystem(marker["scores"])
    t = pq.read_table(fs.open_input_file(path), columns=["product", "status", "score", "is_anomalous"])
    products = np.asarray(t["product"].fill_null("").to_pylist(), dtype=object)
    scores = np.asarray(pc.cast(t["score"], "float64").fill_null(np.nan).to_numpy(zero_copy_only=False))
    ok = pc.fill_null(pc.equal(t["status"], "ok"), False).to_numpy(zero_copy_only=False) & np.isfinite(scores)
    anomalous = pc.fill_null(t["is_anomalous"], False).to_numpy(zero_copy_only=False)
    trail = trailing(night, model_version)  # before this night's record is written (it is not its own baseline)
    dist = record(night, model_version, products, scores, ok, anomalous)
    tested = test_night(dist, calibration_of(files, sorted(dist["products"])), trail)
    result = {"model_version": str(model_version), "products": tested,
              "flagged": sorted(p for p, r in tested.items() if r["flagged"]), "lines": describe(tested),
              "trailing_scores": {p: len(v) for p, v in sorted(trail.items())},
              "settings": {"alpha": ALPHA, "d_min": D_MIN, "alarm_rate_max": ALARM_RATE_MAX, "min_rows": MIN_ROWS,
                           "trailing_nights": TRAILING_NIGHTS}}
    storage.write_bytes(result_uri(night), json.dumps(result, indent=1).encode())
    return result


def read_result(night) -> dict | None:
    try:
        return json.loads(storage.read_bytes(result_uri(night)))
    except FileNotFoundError:
        return None
