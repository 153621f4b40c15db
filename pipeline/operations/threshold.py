"""A product's operating point without retraining. Two ways to say it:

- ``--sensitivity S`` (0 < S < 1): the share of the product's normal calibration images (the ones behind its
  fitted threshold: held-out train normals, or the shots' leave-one-out scores) that the new threshold flags:
  threshold = their (1 - S) quantile (linear interpolation). S = 0.01 flags the top 1 % of known normals: more
  sensitive than the fit's max(max, mean + 3 std), which flags none of them. With n calibration normals, S below
  1/n resolves to about their maximum.
- ``--value T``: the threshold itself (a finite positive image score).

The new version records the point (ProductSpec.operating_point) beside the fit's own threshold, so a later
sensitivity is always taken from the calibration normals, never compounded.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from pipeline import lineage, registry, storage
from pipeline.errors import UsageError
from pipeline.nightly import nights


def last_scored_night(deployment: str) -> tuple[str, str] | None:
    """(output root, date) of the deployment's newest finished scoring run, from its MLflow runs; None if none."""
    c = registry.client()
    exp = c.get_experiment_by_name(registry.model_name(deployment))
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], "tags.job = 'score' and attributes.status = 'FINISHED'",
                         order_by=["attributes.start_time DESC"], max_results=20)
    for r in runs:
        out, date = r.data.params.get("output"), r.data.params.get("date")
        if out and date and nights.Night(out, deployment, date).published():
            return out, date
    return None


def night_flags(deployment: str, wanted: dict[str, dict[str, float]]) -> dict | None:
    """What each threshold flags among each product's scored rows of the last published night, found and read
    once: {"date", "output", "products": {product: {"scored", "flags": {name: n}}}} for `wanted`
    ({product: {name: threshold}}); None when no night was scored."""
    where = last_scored_night(deployment)
    if where is None:
        return None
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    night = nights.Night(where[0], deployment, where[1])
    fs, path = storage.arrow_filesystem(night.published()["scores"])
    t = pq.read_table(fs.open_input_file(path), columns=["product", "status", "score"])
    ok = t.filter(pc.fill_null(pc.equal(t["status"], "ok"), False))
    products = np.asarray(ok["product"].to_pylist(), dtype=object)
    scores = np.asarray(pc.cast(ok["score"], "float64").fill_null(np.nan).to_numpy(zero_copy_only=False))
    out = {}
    for product, thresholds in wanted.items():
        s = scores[(products == product) & np.isfinite(scores)]
        out[product] = {"scored": int(len(s)), "flags": {k: int((s > v).sum()) for k, v in thresholds.items()}}
    return {"date": where[1], "output": storage.redact(where[0]), "products": out}


def flags_on_night(deployment: str, product: str, thresholds: dict[str, float]) -> dict | None:
    """night_flags for one product: {"date", "output", "scored", "flags": {name: n}}; None when no night."""
    n = night_flags(deployment, {product: thresholds})
    return None if n is None else {"date": n["date"], "output": n["output"], **n["products"][product]}


def set_operating_point(deployment: str, product: str, sensitivity: float | None = None, value: float | None = None,
                        from_alias: str = "production") -> dict:
    """Register a new version whose `product` has the operating point given (one of sensitivity, value)."""
    if (sensitivity is None) == (value is None):
        raise UsageError("give one of --sensitivity S or --value T")
    parent = lineage.open_parent(deployment, from_alias)
    spec = parent.spec
    if product not in spec.products:
        raise UsageError(f"version {parent.version} has no product {product!r} (it has: {', '.join(sorted(spec.products))})")
    old = spec.products[product]
    fitted = float((old.operating_point or {}).get("calibrated", old.threshold))  # the fit's own threshold
    if sensitivity is not None:
        if not (0.0 < sensitivity < 1.0) or not math.isfinite(sensitivity):
            raise UsageError(f"--sensitivity {sensitivity}: a share of normal calibration images, 0 < S < 1")
        cal = parent.fit_record(product).get("calibration_scores") or []
        cal = [float(x) for x in cal if isinstance(x, (int, float)) and math.isfinite(x)]
        if not cal:
            raise UsageError(f"version {parent.version} keeps no calibration scores for {product!r}: give --value T")
        new_t = float(np.quantile(np.asarray(cal), 1.0 - sensitivity))
        point = {"kind": "sensitivity", "value": float(sensitivity), "calibrated": fitted, "n_calibration": len(cal)}
    else:
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"--value {value}: a threshold is a finite positive image score")
        new_t = float(value)
        point = {"kind": "value", "value": float(value), "calibrated": fitted}
    if new_t <= 0:
        raise UsageError(f"sensitivity {sensitivity} gives threshold {new_t:g}, which is not positive: choose a "
                         "lower sensitivity or --value")
    night = flags_on_night(deployment, product, {"old": old.threshold, "new": new_t})
    ps = dataclasses.replace(old, threshold=new_t, operating_point=point)
    new = dataclasses.replace(spec, products=dict(spec.products) | {product: ps})
    details = {"product": product, "old_threshold": old.threshold, "new_threshold": new_t,
               "old_operating_point": lineage.how(old), "new_operating_point": lineage.how(ps), "operating_point": point,
               "last_night": night or "none scored"}
    line = (f"{product}: threshold {old.threshold:.5g} ({lineage.how(old)}) -> {new_t:.5g} ({lineage.how(ps)})"
            + (f"; on the night of {night['date']} it flags {night['flags']['old']} -> {night['flags']['new']} of "
               f"{night['scored']}" if night else ""))
    with lineage.working_dir() as out:
        lineage.copy_artifact(parent, out)
        mv = lineage.register_derived(parent, out, new, "threshold", details, summary_line=line)
    return {"model_version": str(mv.version), "parent_version": parent.version, "product": product,
            "old": {"threshold": old.threshold, "how": lineage.how(old)},
            "new": {"threshold": new_t, "how": lineage.how(ps), **point}, "last_night": night, "line": line,
            "lineage": mv.tags.get("lineage", ""), "random_weights": spec.is_random}
