"""Source images -> archive shards. Source layouts (detected):

- MVTec-AD: ``<product>/train/good/``, ``<product>/test/<defect>/``,
  ``<product>/ground_truth/<defect>/<name>_mask.png`` (split=train for reference normals, test otherwise).
- VisA: ``split_csv/1cls.csv`` (columns object, split, label, image, mask; paths relative to the root).
- Real-IAD: ``realiad_jsons/<product>.json`` ({"meta": {"prefix", "normal_class"}, "train": [...],
  "test": [...]}, entries with category, anomaly_class, image_path, mask_path) and images under one of
  ``realiad_1024``, ``realiad_512``, ``realiad_256``, ``realiad_raw``.
- Flat: a folder or S3 prefix of images (recursively), all of one ``product``; split=test, label unknown.

Bytes are stored as captured; an image that does not decode is still archived (and counted), so the
scorer reports it as an error row instead of it vanishing here. Every source file is accounted for: archived
(as an image, or as a mask or layout file), or skipped with its reason in the report. Formats: PNG, JPEG,
BMP, TIFF, WebP and GIF; a multi-page TIFF or an animated GIF is archived whole and scored on its first
frame. An ingest is atomic (archive.ShardWriter): if it fails, the archive is as it was.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import posixpath
import re
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.errors import PipelineError, UsageError
from pipeline.sources import archive
from pipeline.sources.images import ImageDecodeError, decode_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


# The words CLIP knows for the public datasets' class codes (a code like "pcb1" or "chewinggum" tokenises into
# fragments): VisA's and Real-IAD's; any other product is named by its code, "_" and "-" read as spaces, unless the
# user names it (jobs.train --class-name, or class_names in the config)
KNOWN_CLASS_TEXT = {
    # VisA
    "candle": "candle", "capsules": "capsules", "cashew": "cashew", "chewinggum": "chewing gum", "fryum": "fryum",
    "macaroni1": "macaroni", "macaroni2": "macaroni", "pcb1": "printed circuit board",
    "pcb2": "printed circuit board", "pcb3": "printed circuit board", "pcb4": "printed circuit board",
    "pipe_fryum": "pipe fryum",
    # Real-IAD
    "audiojack": "audio jack", "bottle_cap": "bottle cap", "button_battery": "button battery", "end_cap": "end cap",
    "fire_hood": "fire hood", "mint": "mint", "mounts": "mounts", "pcb": "printed circuit board",
    "phone_battery": "phone battery", "plastic_nut": "plastic nut", "plastic_plug": "plastic plug",
    "porcelain_doll": "porcelain doll", "regulator": "regulator", "rolled_strip_base": "rolled strip base",
    "sim_card_set": "sim card set", "terminalblock": "terminal block", "toy_brick": "toy brick",
    "transistor1": "transistor", "u_block": "u block", "usb_adaptor": "usb adaptor", "vcpu": "cpu",
    "wooden_beads": "wooden beads", "woodstick": "wood stick",
}


def class_names(products: list[str], given: dict[str, str] | None = None) -> dict[str, str]:
    """Every product's prompt words: the user's (`given`), else the known dataset code's, else its name."""
    given = given or {}
    return {p: given.get(p) or KNOWN_CLASS_TEXT.get(p.lower()) or p.replace("_", " ").replace("-", " ")
            for p in products}


class SourceReadError(PipelineError):
    """A source file could not be read: the ingest changes nothing (unless skips are allowed)."""


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # s3:, file:, http:, C: ...


def manifest_path(root: str, rel: str, where: str) -> str:
    """A path a dataset manifest names (VisA csv, Real-IAD json), joined onto the dataset root; refused when it
    is not a plain relative path inside the root: absolute, a scheme or drive, a '..' component. Nothing is read."""
    rel = (rel or "").strip()
    parts = rel.replace("\\", "/").split("/")
    if not rel or rel.startswith(("/", "\\", "~")) or _SCHEME.match(rel) or ".." in parts:
        raise UsageError(f"{where}: path {rel!r} leaves the dataset root {root} (absolute, a scheme or '..'): "
                         "refused, nothing read")
    return storage.join(root, "/".join(p for p in parts if p not in ("", ".")))


def check_inside(root: str, uri: str, where: str) -> None:
    """`uri` must lie inside the dataset root; for a local root after resolving symlinks (a link out of the
    root, to /proc or ~/.aws, is refused before it is read)."""
    if storage.is_remote(root):
        base, got = storage.normalize(root) + "/", storage.normalize(uri)
    else:
        base, got = os.path.realpath(storage.normalize(root)) + os.sep, os.path.realpath(storage.normalize(uri))
    if not got.startswith(base):
        raise UsageError(f"{where}: {uri} resolves to {got}, outside the dataset root {root}: refused, nothing read")


@dataclass
class IngestReport:
    rows: int = 0
    undecodable: list[str] = field(default_factory=list)  # archived anyway: they score as error rows
    skipped: list[str] = field(default_factory=list)      # "<uri>: <reason>" of every source file not archived
    missing_masks: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    layout: str = ""
    products: dict[str, int] = field(default_factory=dict)
    before: dict[str, int] = field(default_factory=dict)  # each ingested product's rows in the partition before


def _rel(uri: str, root: str) -> str:
    root = storage.normalize(root).rstrip("/")
    u = storage.normalize(uri)
    return u[len(root):].lstrip("/").replace("\\", "/")


def _is_image(uri: str) -> bool:
    return uri.lower().endswith(IMAGE_EXTENSIONS)


def detect_layout(files: list[str], root: str) -> str:
    rels = [_rel(f, root) for f in files]
    if "split_csv/1cls.csv" in rels:
        return "visa"
    if any(r.startswith("realiad_jsons/") and r.endswith(".json") for r in rels):
        return "realiad"
    for f in files:
        parts = _rel(f, root).split("/")
        if len(parts) >= 4 and parts[1] in ("train", "test") and _is_image(f):
            return "mvtec"
    return "flat"


def _mvtec_rows(files: list[str], root: str, report: IngestReport):
    masks = {}
    for f in files:
        parts = _rel(f, root).split("/")
        if len(parts) == 4 and parts[1] == "ground_truth":
            stem = posixpath.splitext(parts[3])[0]
            stem = stem[: -len("_mask")] if stem.endswith("_mask") else stem
            masks[(parts[0], parts[2], stem)] = f
    for f in files:
        parts = _rel(f, root).split("/")
        if len(parts) != 4 or parts[1] not in ("train", "test") or not _is_image(f):
            continue
        product, split, defect, name = parts
        stem = posixpath.splitext(name)[0]
        label = 0 if defect == "good" else 1
        mask_uri = masks.get((product, defect, stem)) if label else None
        if label and mask_uri is None:
            report.missing_masks.append(f)
        yield {
            "image_id": f"{product}/{split}/{defect}/{stem}",
            "product": product, "split": split, "label": label, "defect": defect,
            "source_uri": f, "mask_uri": mask_uri,
        }


def _visa_rows(root: str, report: IngestReport):
    text = storage.read_bytes(storage.join(root, "split_csv", "1cls.csv")).decode()
    for n, r in enumerate(csv.DictReader(io.StringIO(text)), start=2):  # line 1 is the header
        where = f"split_csv/1cls.csv line {n}"
        product, split, label = r["object"], r["split"].strip(), r["label"].strip().lower()
        if split not in ("train", "test"):
            raise UsageError(f"VisA split csv: unknown split {split!r} for {r['image']}")
        lab = 0 if label == "normal" else 1
        mask = r.get("mask") or None
        if lab and not mask:
            report.missing_masks.append(r["image"])
        stem = posixpath.splitext(posixpath.basename(r["image"]))[0]
        yield {"image_id": f"{product}/{split}/{'good' if lab == 0 else 'anomaly'}/{stem}", "product": product,
               "split": split, "label": lab, "defect": "good" if lab == 0 else "anomaly",
               "source_uri": manifest_path(root, r["image"], f"{where} (image)"),
               "mask_uri": manifest_path(root, mask, f"{where} (mask)") if (lab and mask) else None}


def _realiad_rows(files: list[str], root: str, report: IngestReport):
    rels = {_rel(f, root) for f in files}
    image_dirs = [d for d in ("realiad_1024", "realiad_512", "realiad_256", "realiad_raw")
                  if any(r.startswith(d + "/") for r in rels)]
    if not image_dirs:
        raise UsageError(f"{root}: realiad_jsons/ found but no realiad_1024|512|256|raw image folder")
    img_dir = image_dirs[0]
    for jf in sorted(r for r in rels if r.startswith("realiad_jsons/") and r.endswith(".json")):
        doc = json.loads(storage.read_bytes(storage.join(root, jf)).decode())
        meta = doc.get("meta", {})
        normal = meta.get("normal_class", "OK")
        for split in ("train", "test"):
            for e in doc.get(split, []):
                product = e["category"]
                prefix = meta.get("prefix") or product
                path = None
                for cand in (f"{img_dir}/{prefix}/{e['image_path']}", f"{img_dir}/{product}/{e['image_path']}",
                             f"{img_dir}/{e['image_path']}"):
                    if cand in rels:
                        path = cand
                        break
                if path is None:
                    raise UsageError(f"Real-IAD: image {e['image_path']} of {jf} not found under {img_dir}/")
                lab = 0 if e.get("anomaly_class", normal) == normal else 1
                mask = None
                if lab and e.get("mask_path"):
                    manifest_path(root, e["mask_path"], f"{jf} {split} entry {e['image_path']!r} (mask_path)")
                    mask = path[: -len(e["image_path"])] + e["mask_path"]
                elif lab:
                    report.missing_masks.append(path)
                stem = posixpath.splitext(e["image_path"])[0]
                yield {"image_id": f"{product}/{split}/{stem}", "product": product, "split": split, "label": lab,
                       "defect": e.get("anomaly_class", normal), "source_uri": storage.join(root, path),
                       "mask_uri": manifest_path(root, mask, f"{jf} (mask_path)") if mask else None}


def _has_partition(archive_uri: str, deployment: str, date: str) -> bool:
    try:
        return bool(archive.shard_uris(archive_uri, deployment, date))
    except (FileNotFoundError, PipelineError):
        return False


def _flat_rows(files: list[str], root: str, product: str):
    for f in files:
        if not _is_image(f):
            continue
        rel = _rel(f, root)
        yield {
            "image_id": f"{product}/{posixpath.splitext(rel)[0]}" if rel else product,
            "product": product, "split": "test", "label": None, "defect": None,
            "source_uri": f, "mask_uri": None,
        }


def _skip_reason(uri: str, layout: str) -> str:
    ext = posixpath.splitext(uri)[1].lower()
    if not _is_image(uri):
        return f"not an image file (extension {ext or 'none'!r}; archived: {', '.join(IMAGE_EXTENSIONS)})"
    return f"outside the {layout} layout (not a train/test image or a mask of one)"


def ingest(source: str, archive_uri: str, deployment: str, date: str, product: str | None = None,
           rows_per_shard: int = 256, allow_skips: bool = False) -> IngestReport:
    """Read SOURCE (MVTec, VisA, Real-IAD layout, or flat with `product`) and write the deployment/date
    partition: the products ingested replace their earlier rows of that night, all at once or not at all.
    A source file that cannot be read fails the ingest (SourceReadError, nothing replaced) unless
    `allow_skips`; a path that leaves the source root, or two products / image ids that differ only by case
    (they would overwrite each other on a case-insensitive store), is a UsageError."""
    archive.check_deployment(deployment)
    archive.check_date(date)
    if product is not None:
        archive.check_product(product)
    files = storage.list_files(source)
    report = IngestReport(layout=detect_layout(files, source))
    if report.layout != "flat" and product is not None:
        raise UsageError(f"--product is for a flat folder of images; this source has the {report.layout} layout")
    used = set()  # source files that became part of a row (images, masks) or describe the layout
    if report.layout == "mvtec":
        rows = _mvtec_rows(files, source, report)
    elif report.layout == "visa":
        rows = _visa_rows(source, report)
        used.add(storage.normalize(storage.join(source, "split_csv", "1cls.csv")))
    elif report.layout == "realiad":
        rows = _realiad_rows(files, source, report)
        used.update(storage.normalize(f) for f in files if _rel(f, source).startswith("realiad_jsons/"))
    else:
        if not product:
            raise UsageError(f"{source} is not in the MVTec, VisA or Real-IAD layout: "
                             "pass --product for a flat folder of images")
        rows = _flat_rows(files, source, product)
    ingested_at = dt.datetime.now(dt.timezone.utc)
    writer = archive.ShardWriter(archive_uri, deployment, date, rows_per_shard)
    seen: dict[str, str] = {}          # image_id.casefold() -> image_id
    products_seen: dict[str, str] = {}  # product.casefold() -> product
    try:
        for row in rows:
            key = row["image_id"].casefold()
            if key in seen:  # e.g. a.png and a.jpg side by side, or A1.png and a1.png
                raise UsageError(f"two source files map to image_id {row['image_id']!r}"
                                 + (f" and {seen[key]!r} (differ only by case)" if seen[key] != row["image_id"] else "")
                                 + f": {row['source_uri']}")
            seen[key] = row["image_id"]
            archive.check_product(row["product"])
            other = products_seen.setdefault(row["product"].casefold(), row["product"])
            if other != row["product"]:
                raise UsageError(f"products {other!r} and {row['product']!r} differ only by case: their shards and "
                                 "heatmaps would overwrite each other on a case-insensitive store; rename one")
            mask_uri = row.pop("mask_uri")
            for u, what in ((row["source_uri"], "image"), (mask_uri, "mask")):
                if u:
                    check_inside(source, u, f"{row['image_id']} ({what})")
            try:
                data = storage.read_bytes(row["source_uri"])
                mask = storage.read_bytes(mask_uri) if mask_uri else None
            except OSError as e:  # a file that vanished or cannot be read: the ingest fails, unless skips are allowed
                reason = f"{row['source_uri']}: unreadable ({type(e).__name__}: {e})"
                if not allow_skips:
                    raise SourceReadError(f"{reason}; nothing was replaced (rerun, or pass --allow-skips to archive "
                                          "the rest without it)") from e
                report.skipped.append(reason)
                used.update(storage.normalize(u) for u in (row["source_uri"], mask_uri) if u)
                continue
            try:
                decode_image(data)
            except ImageDecodeError as e:
                report.undecodable.append(f"{row['source_uri']}: {e}")
            captured = storage.modified_time(row["source_uri"]) or ingested_at
            if captured.tzinfo is None:
                captured = captured.replace(tzinfo=dt.timezone.utc)
            writer.write({**row, "image": data, "captured_at": captured, "mask": mask})
            used.update(storage.normalize(u) for u in (row["source_uri"], mask_uri) if u)
            report.products[row["product"]] = report.products.get(row["product"], 0) + 1
        if writer.pending + writer.n_rows == 0:
            raise UsageError(f"no images found under {source} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        earlier = archive.product_counts(archive_uri, deployment, date) if _has_partition(archive_uri, deployment, date) else {}
        for p in earlier:
            if p is not None and p.casefold() in products_seen and products_seen[p.casefold()] != p:
                raise UsageError(f"product {products_seen[p.casefold()]!r} differs only by case from {p!r}, already in "
                                 f"this partition: their shards would overwrite each other on a case-insensitive store")
        report.before = {p: earlier.get(p, 0) for p in report.products}
        report.shards = writer.close()
    except BaseException:
        writer.abort()  # a failed ingest changes nothing
        raise
    report.rows = writer.n_rows
    report.skipped += [f"{f}: {_skip_reason(f, report.layout)}" for f in files if storage.normalize(f) not in used]
    return report
