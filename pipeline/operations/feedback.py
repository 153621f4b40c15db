"""Inspectors' verdicts back into the model, without retraining.

The labels file (CSV or Parquet) has `image_id` and `verdict` (`normal` | `defect`), optionally `date` and `note`;
each image_id names an archived image of the deployment (a scored night's). Nothing is guessed: an unknown image
id, an unknown verdict, an image of a product the version does not hold, and a repeated image id (twice with the
same verdict: used once and reported; with both verdicts: not used, reported) are listed, never used.

- **normal** (a confirmed false alarm, or any image an inspector calls normal): its patch features join its
  product's memory bank, so it and images like it find near neighbours there (AnoPLe's bank map, the
  1-NN distance of Sec. 3.5). Bounded: the patches added by feedback never exceed FEEDBACK_IMAGES images' worth
  (16 x the patches of one shot: a 4-shot bank grows at most 5-fold); past that, greedy k-center coreset
  selection (PatchCore's) over all feedback patches, old and new, keeps those that cover the others best, so
  feedback night after night stays within the bound. The shots' own patches are never dropped.
- the product's threshold is then recalibrated on its normal calibration images scored against the new bank
  (the fit's own rule, threshold = max(max s, mean s + 3 std s), the fit's map levels kept), never above the
  parent's threshold, so defect recall cannot drop by a higher threshold.
- **defect**: kept per product as a labelled evaluation set of real defects
  (`<archive>/_feedback/deployment=D/defects/product=P/<labels sha>.parquet`, archive rows with label 1, no
  mask), which the evaluation scores (image-level recall at the threshold) and the promote gate reads.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import torch

from pipeline import artifact, lineage, storage
from pipeline.errors import UsageError
from pipeline.fitting.bank import MemoryBank, pick_backend
from pipeline.fitting.shots import load_shots, threshold_from
from pipeline.model.scoring import component_maps, encode, fuse, text_features
from pipeline.nightly.scorer import load_model, pick_device
from pipeline.sources import archive
from pipeline.sources.images import ImageDecodeError, decode_image, to_model_input

VERDICTS = ("normal", "defect")
FEEDBACK_IMAGES = 16  # feedback patches a product's bank may hold, in images' worth (see the module's text)
FEEDBACK_ROOT = "_feedback"


def read_labels(uri: str) -> tuple[list[dict], bytes]:
    """The labels file's rows (image_id, verdict, date, note as strings) and its bytes. CSV by a .csv name,
    Parquet otherwise (or by its magic bytes)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise UsageError(f"labels file {uri} does not exist") from None
    if not data.strip():
        raise UsageError(f"labels file {uri} is empty")
    try:
        if data[:4] == b"PAR1":
            table = pq.read_table(io.BytesIO(data))
        elif uri.lower().endswith((".csv", ".csv.gz")) or b"," in data[:200]:
            import csv
            head = next(csv.reader([data.decode("utf-8-sig", errors="replace").splitlines()[0]]), [])
            # every column as text: an image_id "007" stays "007", a date stays the string it was
            table = pcsv.read_csv(io.BytesIO(data), convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in head}))
        else:
            raise UsageError(f"labels file {uri} is neither CSV nor Parquet")
    except (pa.ArrowInvalid, OSError) as e:
        raise UsageError(f"labels file {uri} is unreadable ({e})") from e
    # header names as people type them ("Image ID", " Verdict"): trimmed, lower case, spaces as underscores
    table = table.rename_columns([str(c).strip().lower().replace(" ", "_").lstrip("\ufeff") for c in table.column_names])
    missing = [c for c in ("image_id", "verdict") if c not in table.column_names]
    if missing:
        raise UsageError(f"labels file {uri} has no column {', '.join(missing)} (columns: {', '.join(table.column_names)})")
    cols = {c: table[c].to_pylist() if c in table.column_names else [None] * table.num_rows
            for c in ("image_id", "verdict", "date", "note")}
    rows = [{c: (None if cols[c][i] is None else str(cols[c][i]).strip()) for c in cols} for i in range(table.num_rows)]
    return rows, data


def sort_verdicts(rows: list[dict]) -> tuple[dict[tuple, str], list[str]]:
    """-> ({(image_id, date or None): verdict} usable, problems): unknown verdicts, empty ids, dates that are not
    YYYY-MM-DD and repeated ids are reported. The date, when given, names the night the image was archived on."""
    seen: dict[tuple, set[str]] = {}
    problems = []
    for n, r in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them (header = 1)
        i, v, d = r["image_id"], (r["verdict"] or "").lower(), r.get("date") or None
        if not i:
            problems.append(f"row {n}: no image_id")
        elif v not in VERDICTS:
            problems.append(f"row {n}: {i}: unknown verdict {r['verdict']!r} (normal | defect)")
        elif d is not None and not archive._DATE.fullmatch(d):
            problems.append(f"row {n}: {i}: date {d!r} is not YYYY-MM-DD")
        else:
            key = (i, d)
            if key in seen:
                problems.append(f"row {n}: {i}: repeated" + ("" if v in seen[key] else " with another verdict"))
            seen.setdefault(key, set()).add(v)
    usable = {}
    for key, vs in seen.items():
        if len(vs) > 1:
            problems.append(f"{key[0]}: both verdicts given: not used")
        else:
            usable[key] = next(iter(vs))
    return usable, problems


def find_rows(archive_uri: str, deployment: str, keys: list[tuple]) -> tuple[dict[tuple, dict], list[str], pa.Schema]:
    """The archived row of each (image_id, date) key: on that date's night, or, without a date, the one row of
    that id in the whole archive. -> (rows by key, problems: unknown ids, ids on several nights without a date)."""
    found, problems, schema = {}, [], archive.SCHEMA
    by_date: dict = {}
    for i, d in keys:
        by_date.setdefault(d, []).append(i)
    for d, ids in sorted(by_date.items(), key=lambda kv: kv[0] or ""):
        try:
            t = archive.Partition(archive_uri, deployment, d).read_table(archive.Rows(image_ids=tuple(sorted(ids))))
        except FileNotFoundError:
            t = None
        except UsageError as e:  # no such night in the archive
            problems += [f"{i}: {e}" for i in ids]
            continue
        rows: dict[str, list[dict]] = {}
        for r in (t.to_pylist() if t is not None else []):
            rows.setdefault(r["image_id"], []).append(r)
        for i in ids:
            rs = rows.get(i, [])
            if not rs:
                problems.append(f"{i}: unknown image id (not in deployment {deployment!r} of {archive_uri}"
                                + (f" on {d})" if d else ")"))
            elif len(rs) > 1:
                problems.append(f"{i}: archived {len(rs)} times" + (f" on {d}" if d else " (several nights): give its date")
                                + ": not used")
            else:
                found[(i, d)] = rs[0]
    return found, problems, schema


def coreset(feats: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Greedy k-center selection (PatchCore): indices of `k` rows of [N, C] unit features, each new pick the row
    farthest from those picked; -> sorted indices."""
    n = len(feats)
    if n <= k:
        return np.arange(n)
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    first = int(np.random.default_rng(seed).integers(n))
    picked = [first]
    dist = torch.cdist(x, x[first:first + 1]).squeeze(1)  # [N]
    for _ in range(k - 1):
        j = int(torch.argmax(dist))
        picked.append(j)
        dist = torch.minimum(dist, torch.cdist(x, x[j:j + 1]).squeeze(1))
    return np.sort(np.asarray(picked))


def _scores(model, product: str, bank: MemoryBank, text, scales: dict, rgbs: list[np.ndarray], device: str,
            batch: int = 16) -> list[float]:
    """The fused image scores the scorer computes for `rgbs` of `product` against `bank`."""
    out = []
    for i in range(0, len(rgbs), batch):
        x = np.stack([to_model_input(r, model.image_size) for r in rgbs[i:i + batch]])
        with torch.inference_mode():
            maps = component_maps(model, encode(model, x, device), [product] * len(x), {product: bank}, text)
            out += [float(s) for s in fuse(model.cfg, maps, [product] * len(x), {product: scales})[0]]
    return out


def apply_feedback(deployment: str, archive_uri: str, labels_uri: str, from_alias: str = "production",
                   device: str = "auto") -> dict:
    """Verdicts -> banks, thresholds and the real-defect set; a new version (alias candidate). Returns a summary."""
    t0 = time.time()
    rows, raw = read_labels(labels_uri)
    verdicts, problems = sort_verdicts(rows)
    parent = lineage.open_parent(deployment, from_alias)
    spec = parent.spec
    by_key, missing, schema = find_rows(archive_uri, deployment, sorted(verdicts, key=lambda k: (k[0], k[1] or "")))
    problems += missing
    normal: dict[str, list[dict]] = {}
    defect: dict[str, list[dict]] = {}
    for key, v in sorted(verdicts.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        r, i = by_key.get(key), key[0]
        if r is None:
            continue
        if r["product"] not in spec.products:
            problems.append(f"{i}: product {r['product']!r} is not in version {parent.version}")
        else:
            (normal if v == "normal" else defect).setdefault(r["product"], []).append(r)
    if not normal and not defect:
        raise UsageError(f"no usable verdict in {labels_uri}; nothing registered:\n  " + "\n  ".join(problems[:50]))
    digest = artifact.sha256(raw)
    device = pick_device(device)
    model = load_model(parent.files, spec, device)
    new = dataclasses.replace(spec, products=dict(spec.products))
    per_product: dict[str, dict] = {}
    with lineage.working_dir() as out:
        lineage.copy_artifact(parent, out)
        for p, rs in sorted(normal.items()):
            ps = spec.products[p]
            record = parent.fit_record(p)
            layers = artifact.bank_arrays(parent.files.read(ps.bank_file), ps.bank_file)
            n_shot = int(record.get("shot_patches", ps.n_patches))  # the K shots' patches come first
            rgbs, bad = [], []
            for r in rs:
                try:
                    rgbs.append(decode_image(r["image"]))
                except ImageDecodeError as e:
                    bad.append(r["image_id"])
                    problems.append(f"{r['image_id']}: does not decode ({e}): not used")
            if not rgbs:
                continue
            feats = []  # per bank layer [n_images * patches, C]
            for i in range(0, len(rgbs), 16):
                x = np.stack([to_model_input(im, model.image_size) for im in rgbs[i:i + 16]])
                with torch.inference_mode():
                    enc = encode(model, x, device)
                    feats.append([f.reshape(-1, f.shape[-1]).cpu().numpy() for f in model.bank_features(enc)])
            added = [np.concatenate([f[j] for f in feats]) for j in range(len(layers))]
            pool = [np.concatenate([layer[n_shot:], a]) for layer, a in zip(layers, added)]  # feedback patches
            bound = FEEDBACK_IMAGES * max(1, n_shot // max(1, len(ps.shots)))  # images' worth of patches
            keep = coreset(np.concatenate(pool, axis=1), bound)  # selected on all layers at once, same rows
            bank_layers = [np.concatenate([layer[:n_shot], f[keep]]).astype(np.float32) for layer, f in zip(layers, pool)]
            bank = MemoryBank(bank_layers, pick_backend(device))
            # recalibrate on the product's normal calibration images against the new bank (map levels kept)
            text = text_features(model, [p])
            cal_rgbs, how = [], ps.calibration
            if ps.calibration == "heldout_normals":
                data = load_shots(archive_uri, deployment, [p], len(ps.shots), spec.seed)[p]
                cal_rgbs = [decode_image(data.images[i]) for i in data.heldout]
            if not cal_rgbs:  # no held-out normals: the confirmed normals' own scores against the shots' bank alone
                cal_rgbs = rgbs
                how = "feedback_normals_vs_shot_bank"
                cal = _scores(model, p, MemoryBank([x[:n_shot] for x in layers], pick_backend(device)), text,
                              ps.map_scales, cal_rgbs, device)
            else:
                cal = _scores(model, p, bank, text, ps.map_scales, cal_rgbs, device)
            thr = min(threshold_from(cal), ps.threshold)  # never above the parent's: recall cannot drop by it
            before = _scores(model, p, MemoryBank(layers, pick_backend(device)), text, ps.map_scales, rgbs, device)
            after = _scores(model, p, bank, text, ps.map_scales, rgbs, device)
            new.products[p] = dataclasses.replace(ps, n_patches=bank.n_patches, threshold=thr)
            lineage.write_file(out, ps.bank_file, bank.to_bytes())
            lineage.write_file(out, artifact.fit_file(p), json.dumps(
                record | {"spec": dataclasses.asdict(new.products[p]), "shot_patches": n_shot,
                          "calibration_scores": cal, "recalibrated_by_feedback": how,
                          "feedback_labels_sha256": digest}))
            per_product[p] = {"normals_used": len(rgbs), "patches_added": int(bank.n_patches - ps.n_patches),
                              "bank_patches": [ps.n_patches, bank.n_patches], "bank_bound": n_shot + bound,
                              "coreset": bool(len(keep) < len(pool[0])),
                              "threshold": [ps.threshold, thr], "recalibrated_on": how,
                              "feedback_normals_score": [float(np.mean(before)), float(np.mean(after))],
                              "feedback_normals_flagged": [int(sum(s > ps.threshold for s in before)),
                                                           int(sum(s > thr for s in after))]}
        kept = {}
        for p, rs in sorted(defect.items()):
            kept[p] = defects_uri(archive_uri, deployment, p, digest)
            table = pa.Table.from_pylist([r | {"label": 1, "split": "feedback"} for r in rs], schema=schema)
            buf = io.BytesIO()
            pq.write_table(table, buf)
            storage.write_bytes(kept[p], buf.getvalue())
            per_product.setdefault(p, {})["defects_kept"] = len(rs)
        counts = {"rows": len(rows), "usable": len(verdicts), "normal": sum(len(v) for v in normal.values()),
                  "defect": sum(len(v) for v in defect.values()), "problems": len(problems)}
        details = {"labels": labels_uri, "labels_sha256": digest, "counts": counts, "per_product": per_product,
                   "problems": problems[:500], "defect_sets": kept}
        local_labels = f"{out}.labels{'.csv' if raw[:4] != b'PAR1' else '.parquet'}"
        with open(local_labels, "wb") as f:
            f.write(raw)
        try:
            mv = lineage.register_derived(
                parent, out, new, "feedback", details, files={f"feedback/{local_labels.rsplit('/', 1)[-1]}": local_labels},
                summary_line=f"feedback {labels_uri}: {counts['normal']} normal (into banks), {counts['defect']} defect "
                             f"(kept for evaluation), {counts['problems']} problem(s) reported")
        finally:
            storage.remove_tree(local_labels)
    return {"model_version": str(mv.version), "parent_version": parent.version, "counts": counts,
            "per_product": per_product, "problems": problems, "defect_sets": kept, "labels_sha256": digest,
            "lineage": mv.tags.get("lineage", ""), "seconds": time.time() - t0, "random_weights": spec.is_random}


def defects_uri(archive_uri: str, deployment: str, product: str, digest: str) -> str:
    return storage.join(storage.normalize(archive_uri), FEEDBACK_ROOT, f"deployment={deployment}", "defects",
                        f"product={product}", f"{digest[:16]}.parquet")


def real_defects(archive_uri: str, deployment: str) -> dict[str, list[dict]]:
    """product -> its inspector-confirmed defect rows (image_id, image) kept by feedback; {} when none."""
    root = storage.join(storage.normalize(archive_uri), FEEDBACK_ROOT, f"deployment={deployment}", "defects")
    try:
        files = storage.list_files(root)
    except FileNotFoundError:
        return {}
    out: dict[str, dict[str, dict]] = {}
    for uri in files:
        if not uri.endswith(".parquet"):
            continue
        for r in pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["image_id", "product", "image"]).to_pylist():
            out.setdefault(r["product"], {})[r["image_id"]] = r  # one row per image, whichever labels file kept it
    return {p: list(v.values()) for p, v in sorted(out.items())}
