"""Evaluating a version, top to bottom: score the labelled test split through the scoring actors, stream the
paper's metrics, log them with curves, a table and example overlays to the version's run (the promote gate
reads them); and the paper's few-shot protocol (fit and evaluate per shots and seed, multi-class or unseen)."""
from __future__ import annotations

import dataclasses
import tempfile

import numpy as np

from pipeline import artifact, registry, storage
from pipeline.cluster import has_gpus
from pipeline.errors import PipelineError, UsageError
from pipeline.evaluation import evidence
from pipeline.evaluation.metrics import PAPER_METRICS, ProductMetrics, summarize
from pipeline.fitting.config import TrainConfig
from pipeline.fitting.ray_train import fit_deployment
from pipeline.fitting.run import with_storage
from pipeline.nightly.score_table import RunInfo
from pipeline.nightly.stages import score_partition
from pipeline.sources import archive


class EvaluationIncomplete(PipelineError):
    """Some labelled test rows (image or mask) could not be scored; the metrics leave them out."""


def evaluate(deployment: str, archive_uri: str, alias: str = "candidate", batch_size: int = 16) -> dict:
    """Score the labelled test split, stream the metrics, log them to the version's run. Returns
    {"per_product": {...}, "mean": {...}, "errors": n, "model_version": v}."""
    mv, uri, spec = registry.resolve(deployment, alias)
    info = RunInfo(deployment=deployment, model_name=mv.name, model_version=str(mv.version), run_id=mv.run_id or "")
    examples = evidence.Examples()
    per, errors, unlabelled = _stream_metrics(archive_uri, deployment, uri, spec, info, None, batch_size, examples,
                                              registry.artifact_sha256(mv))
    if not per:
        raise UsageError(f"no labelled, scorable test images for deployment {deployment!r} in {archive_uri}")
    results = {p: m.compute() for p, m in sorted(per.items())}
    mean = summarize(results)
    with registry.run(run_id=mv.run_id) as log:
        flat = {f"eval.{k}.{registry.metric_key(p)}": v for p, r in results.items() for k, v in r.items() if np.isfinite(v)}
        flat.update({f"eval.{k}.mean": v for k, v in mean.items() if np.isfinite(v)})
        flat["eval.errors"] = len(errors)
        log.metrics(flat)
        log.json({"per_product": results, "mean": mean, "errors": errors}, "evaluation.json")
        ids = [e[1] for e in examples.best.values()]
        images = archive.read_images(archive_uri, deployment, None, ids) if ids else {}
        evidence.log_evaluation(log, per, results, examples, images,
                                {p: ps.threshold for p, ps in spec.products.items()}, str(mv.version))
    if errors:  # an evaluation that could not use every labelled image is not one the gate accepts
        raise EvaluationIncomplete(
            f"{len(errors)} labelled test image(s) or mask(s) could not be used, so version {mv.version} is not "
            "marked evaluated:\n  " + "\n  ".join(errors[:20]) + ("\n  ..." if len(errors) > 20 else ""))
    real = real_defect_recall(deployment, archive_uri, uri, spec, registry.artifact_sha256(mv))
    if real:
        with registry.run(run_id=mv.run_id) as log:
            log.metrics({f"eval.real_defect_recall.{registry.metric_key(p)}": r["recall"] for p, r in real.items()}
                        | {"eval.real_defect_recall": _pooled_recall(real)})
            log.json(real, "evaluation/real_defects.json")
    registry.record_evaluation(mv, mean, len(errors), {"real_defect_recall": _pooled_recall(real),
                                                       "real_defects": sum(r["n"] for r in real.values())} if real else None)
    clipped = sum(m.pixel.clipped for m in per.values())
    return {"per_product": results, "mean": mean, "errors": errors, "unlabelled": unlabelled,
            "model_version": mv.version, "random_weights": spec.is_random, "clipped_pixels": clipped,
            "real_defects": real}


def _pooled_recall(real: dict) -> float:
    n = sum(r["n"] for r in real.values())
    return sum(r["caught"] for r in real.values()) / n if n else float("nan")


def real_defect_recall(deployment: str, archive_uri: str, uri: str, spec: artifact.ModelSpec,
                       artifact_sha256: str | None) -> dict:
    """Image-level recall at each product's threshold on the inspector-confirmed defects that feedback kept
    (pipeline.operations.feedback): {product: {"n", "caught", "recall", "missed": [image_id ...]}}; {} when the
    plant has confirmed none. Scored in this process with the version's scorer (a labelled set is small); an image
    that does not decode is reported as missed, never dropped."""
    from pipeline.nightly.scorer import Scorer
    from pipeline.operations.feedback import real_defects
    from pipeline.sources.images import ImageDecodeError, decode_image, to_model_input
    sets = {p: rs for p, rs in real_defects(archive_uri, deployment).items() if p in spec.products}
    if not sets:
        return {}
    scorer = Scorer.load(registry.materialize(uri), sorted(sets), expected_sha256=artifact_sha256)
    out = {}
    for p, rs in sets.items():
        caught, missed = 0, []
        for r in rs:
            try:
                x = to_model_input(decode_image(r["image"]), spec.image_size)[None]
            except ImageDecodeError:
                missed.append(f"{r['image_id']} (does not decode)")
                continue
            score = float(scorer.score(x, [p])[0][0])
            if score > scorer.thresholds[p]:
                caught += 1
            else:
                missed.append(r["image_id"])
        out[p] = {"n": len(rs), "caught": caught, "recall": caught / len(rs), "missed": missed[:100]}
    return out


def _stream_metrics(archive_uri: str, deployment: str, uri: str, spec: artifact.ModelSpec, info: RunInfo,
                    only: list[str] | None, batch_size: int, examples: evidence.Examples | None = None,
                    artifact_sha256: str | None = None):
    """Score the labelled test split through Ray Data and fold each image into its product's streaming
    metrics (and offer it to `examples`). Returns ({product: ProductMetrics}, error lines of labelled rows, count
    of unlabelled rows)."""
    parts = score_partition(archive.Partition(archive_uri, deployment), uri, spec, info, split="test", with_masks=True,
                            only=only, batch_size=batch_size, use_gpu=has_gpus(),
                            artifact_sha256=artifact_sha256)
    per: dict[str, ProductMetrics] = {}
    errors, unlabelled = [], 0
    for ds in parts:
        for b in ds.iter_batches(batch_format="numpy", batch_size=batch_size):
            for i in range(len(b["image_id"])):
                if b["label"][i] < 0:  # nightly rows carry no label: not part of the evaluation
                    unlabelled += 1
                elif b["status"][i] != "ok":
                    errors.append(f"{b['image_id'][i]}: {b['error'][i]}")
                else:
                    per.setdefault(str(b["product"][i]), ProductMetrics()).update(
                        b["score"][i], int(b["label"][i]), b["map"][i], b["mask"][i])
                    if examples is not None:
                        examples.offer(str(b["product"][i]), int(b["label"][i]), float(b["score"][i]),
                                       str(b["image_id"][i]), b["map"][i], b["mask"][i])
    return per, errors, unlabelled


def evaluate_protocol(base: TrainConfig, shots_list: list[int], seeds: list[int], setting: str = "multi-class",
                      batch_size: int = 16) -> dict:
    """The paper's protocol: for each k and seed, fit (multi-class: one model on every product;
    unseen: per product, prompts trained on all the others) and evaluate on the test split.
    Returns {k: {product: {metric: [value per seed]}}} and logs it to MLflow."""
    if setting not in ("multi-class", "unseen"):
        raise UsageError(f"setting {setting!r} is 'multi-class' or 'unseen'")
    base = with_storage(base)
    products = archive.products_in(base.archive, base.deployment)
    if setting == "unseen" and len(products) < 2:
        raise UsageError("leave-one-product-out needs at least two products")
    table: dict = {}
    with registry.run(base.deployment, f"protocol-{setting}") as log:
        log.tags({"job": "evaluate-protocol", "setting": setting})
        log.params({"shots": ",".join(map(str, shots_list)), "seeds": ",".join(map(str, seeds)),
                           "backbone": base.backbone, "weights": base.weights})
        log.params(registry.config_params(base.anople))
        for k in shots_list:
            for seed in seeds:
                groups = [(None, ())] if setting == "multi-class" else [
                    ([p], tuple(q for q in products if q != p)) for p in products]
                for only, teach in groups:
                    cfg = dataclasses.replace(base, shots=k, seed=seed, prompt_products=teach,
                                              anople=dataclasses.replace(base.anople, seed=seed))
                    with tempfile.TemporaryDirectory() as out:
                        spec, _ = fit_deployment(cfg, out)
                        digest = artifact.write_manifest(out)  # its actors check what they load, as a night's do
                        uri = storage.join(storage.normalize(cfg.storage_path), cfg.run_key(), "artifact")
                        storage.remove_tree(uri)
                        storage.upload_tree(out, uri)  # where every actor can read it
                    # a protocol model is never registered: it is named by its run key
                    info = RunInfo(deployment=base.deployment, model_name=f"{registry.model_name(base.deployment)}-protocol",
                                   model_version=cfg.run_key(), run_id=log.id)
                    per, _, _ = _stream_metrics(base.archive, base.deployment, uri, spec, info, only, batch_size,
                                                artifact_sha256=digest)
                    for p, r in ((p, m.compute()) for p, m in per.items()):
                        for m in PAPER_METRICS:
                            table.setdefault(k, {}).setdefault(p, {}).setdefault(m, []).append(r[m])
            for m in PAPER_METRICS:
                for p, r in table[k].items():
                    log.metrics({f"k{k}.{m}.{registry.metric_key(p)}": float(np.mean(r[m]))})
                log.metrics({f"k{k}.{m}.mean": float(np.mean([np.mean(r[m]) for r in table[k].values()]))})
        log.json({str(k): v for k, v in table.items()}, "protocol.json")
    return table
