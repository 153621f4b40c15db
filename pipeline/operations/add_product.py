"""A new product line on a trained model, without retraining: AnoPLe's prompts learn class-agnostic normality
(the text side reads [prefix][context][class name] tokens, the visual side is shared by every product), so a new
product needs only what is per product: its K shots' memory bank, its class words' text features (computed from
its name at load) and its threshold and map levels, calibrated on its normal images exactly as a fit does
(pipeline.fitting.shots.fit_product) with the parent's prompted encoder."""
from __future__ import annotations

import dataclasses
import json
import time

from pipeline import artifact, lineage
from pipeline.errors import UsageError
from pipeline.fitting.bank import pick_backend
from pipeline.fitting.shots import fit_product, load_shots
from pipeline.nightly.scorer import load_model, pick_device
from pipeline.sources import archive
from pipeline.sources.ingest import class_names


def add_products(deployment: str, archive_uri: str, products: list[str], shots: int, from_alias: str = "production",
                 device: str = "auto", given_names: dict[str, str] | None = None) -> dict:
    """Banks, thresholds and class words of `products` (K normal train shots each from the archive) on the
    parent's trained prompts; registered as a new version (alias candidate). Returns a summary."""
    t0 = time.time()
    products = [archive.check_product(p) for p in dict.fromkeys(products)]
    if not 1 <= shots:
        raise UsageError(f"--shots {shots}: at least one normal shot per product")
    parent = lineage.open_parent(deployment, from_alias)
    spec = parent.spec
    already = [p for p in products if p in spec.products]
    if already:
        raise UsageError(f"version {parent.version} already holds {', '.join(already)}: nothing added (retrain, "
                         "or use threshold / feedback to change a product it has)")
    present = set(archive.products_in(archive_uri, deployment))
    missing = [p for p in products if p not in present]
    if missing:
        raise UsageError(f"no train images of {', '.join(missing)} for deployment {deployment!r} in {archive_uri} "
                         f"(products there: {', '.join(sorted(present)) or 'none'})")
    device = pick_device(device)
    model = load_model(parent.files, spec, device)
    words = class_names(products, given_names)
    # the new products' class words join the config the scorer builds its text features from
    model.cfg.class_names = dict(model.cfg.class_names) | words
    data = load_shots(archive_uri, deployment, products, shots, spec.seed)
    added, fits = {}, {}
    for p in products:
        try:
            fit = fit_product(model, p, data[p], device, pick_backend(device))
        except Exception as e:
            e.add_note(f"while adding product {p!r}")
            raise
        fits[p] = fit
        added[p] = {"class_name": fit.class_name, "shots": fit.shots, "threshold": fit.threshold,
                    "calibration": fit.calibration, "n_calibration": len(fit.calibration_scores),
                    "skipped_undecodable": list(fit.skipped)}
    new = dataclasses.replace(spec, products=dict(spec.products),
                              anople=spec.anople | {"class_names": dict(sorted(
                                  {**(spec.anople.get("class_names") or {}), **words}.items()))})
    with lineage.working_dir() as out:
        lineage.copy_artifact(parent, out)
        for p, fit in fits.items():
            ps = dataclasses.replace(fit.spec(), in_prompt_training=False)
            new.products[p] = ps
            lineage.write_file(out, artifact.bank_file(p), fit.bank.to_bytes())
            lineage.write_file(out, artifact.fit_file(p), json.dumps(
                {"product": p, "spec": dataclasses.asdict(ps), "calibration_scores": fit.calibration_scores,
                 "skipped": list(fit.skipped), "added_to_version": parent.version}))
        details = {"archive": archive_uri, "products_added": sorted(products), "shots": shots,
                   "not_in_prompt_training": sorted(products), "added": added}
        mv = lineage.register_derived(
            parent, out, new, "add-product", details,
            summary_line=f"added {', '.join(sorted(products))} ({shots} shot(s) each) to version {parent.version} "
                         "without retraining: not in prompt training")
    return {"model_version": str(mv.version), "parent_version": parent.version, "products_added": sorted(products),
            "added": added, "lineage": mv.tags.get("lineage", ""), "seconds": time.time() - t0,
            "random_weights": spec.is_random, "device": device}
