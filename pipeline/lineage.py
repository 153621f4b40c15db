"""New versions derived from a registered one without a fit: the everyday operations (jobs.add_product,
jobs.feedback, jobs.threshold) each copy the parent's artifact, change what they change, and register the result
as a new version with alias `candidate` and its lineage. Nothing here moves `production`: the promote gate stays
the one way into it (a derived version has no evaluation until someone runs one).

The copy is read through the parent's manifest (artifact.Files): a tampered parent is refused before anything is
derived from it, and the new version gets a manifest and SHA-256 of its own, as a trained one does.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

from pipeline import artifact, registry, serving
from pipeline.errors import UsageError

# version tags a derived version takes over from its parent: what the promote gate and the scorer read.
# Never "evaluation": a derived model is a new model, and the gate asks for its own evaluation.
INHERITED_TAGS = ("weights_kind", "backbone", "weights", "shots")


@dataclass
class Parent:
    """A registered version opened for deriving: its version, its checked files and its spec."""
    mv: object
    files: artifact.Files
    spec: artifact.ModelSpec

    @property
    def version(self) -> str:
        return str(self.mv.version)

    def fit_record(self, product: str) -> dict:
        """The product's calibration record (fits/<product>.json: spec, calibration_scores), {} if none."""
        rel = artifact.fit_file(product)
        if self.files.files is not None and rel not in self.files.files:
            return {}
        try:
            return json.loads(self.files.read(rel))
        except FileNotFoundError:
            return {}


def open_parent(deployment: str, alias: str) -> Parent:
    """The version behind `alias`, every file checked against the manifest the registry recorded."""
    mv = registry.get_version(deployment, alias=alias)
    files = artifact.Files(registry.artifact_uri(mv), registry.artifact_sha256(mv))
    if files.files is None:
        raise UsageError(f"{registry.model_name(deployment)} version {mv.version} was registered before model "
                         "manifests: retrain it before deriving versions from it")
    spec = artifact.ModelSpec.from_json(files.read("model.json").decode()).validate()
    return Parent(mv, files, spec)


def copy_artifact(parent: Parent, out_dir: str) -> None:
    """Every file of the parent's manifest into local `out_dir` (each checked as it is read)."""
    for rel in parent.files.files:
        path = os.path.join(out_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(parent.files.read(rel))


def write_file(out_dir: str, rel: str, data: bytes | str) -> None:
    path = os.path.join(out_dir, *rel.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def lineage_line(parent_mv, version: str, operation: str) -> str:
    """`v3 threshold <- v2 feedback <- v1 train`: newest first, read from the parent's own lineage tag."""
    before = (parent_mv.tags or {}).get("lineage") or f"v{parent_mv.version} {(parent_mv.tags or {}).get('operation', 'train')}"
    return f"v{version} {operation} <- {before}"[:4900]


def register_derived(parent: Parent, out_dir: str, spec: artifact.ModelSpec, operation: str, details: dict,
                     files: dict[str, str] | None = None, summary_line: str = "") -> object:
    """Validate and save `spec` into `out_dir` (the parent's copy, changed), write its manifest, log it in a new
    MLflow run of the deployment (tags job/operation/parent_version, `details` as params and JSON, `files` as
    artifacts: {artifact path: local file}) and register it: a new version with alias `candidate`.
    Returns the new model version."""
    import mlflow
    artifact.save_spec(spec.validate(), out_dir)
    digest = artifact.write_manifest(out_dir)
    deployment = spec.deployment
    with registry.run(deployment, f"{operation}-from-v{parent.version}") as log:
        tags = {"job": operation, "operation": operation, "parent_version": parent.version,
                "weights_kind": spec.weights_kind, "random_weights": str(spec.is_random).lower(),
                "artifact_sha256": digest}
        if summary_line:
            tags["mlflow.note.content"] = summary_line  # the run's description in the MLflow UI
        log.tags(tags)
        if spec.is_random:
            log.tags({"warning": registry.RANDOM_WEIGHTS_BANNER})
        log.params({k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v))[:6000]
                    for k, v in details.items()} | {"parent_version": parent.version})
        log.json(details, f"{operation}.json")
        for path, local in (files or {}).items():
            mlflow.log_artifact(local, artifact_path=os.path.dirname(path) or None)
        logged = serving.log_model(out_dir, digest)
        tags = {k: parent.mv.tags[k] for k in INHERITED_TAGS if k in (parent.mv.tags or {})}
        tags |= {"weights_kind": spec.weights_kind, "artifact_sha256": digest, "parent_version": parent.version,
                 "operation": operation}
        mv = registry.register(deployment, log.id, logged.model_id, tags=tags)
        line = lineage_line(parent.mv, str(mv.version), operation)
        client = registry.client()
        client.set_model_version_tag(mv.name, mv.version, "lineage", line)
        if summary_line:
            client.update_model_version(mv.name, mv.version, description=f"{summary_line}\nlineage: {line}")
        log.tags({"lineage": line, "model_version": str(mv.version)})
    return registry.get_version(deployment, version=mv.version)


def working_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="anople-derive-")


def version_spec(mv) -> artifact.ModelSpec:
    """A version's model.json (checked against its manifest and the registry's record), without its banks."""
    files = artifact.Files(registry.artifact_uri(mv), registry.artifact_sha256(mv))
    return artifact.ModelSpec.from_json(files.read("model.json").decode()).validate()


def how(ps: artifact.ProductSpec) -> str:
    """A product's operating point in words."""
    op = ps.operating_point or {}
    if op.get("kind") == "sensitivity":
        return f"sensitivity {op['value']:g} (quantile {1 - op['value']:g} of {ps.n_calibration} calibration normals)"
    if op.get("kind") == "value":
        return f"absolute value {op['value']:g}"
    return f"the fit's ({ps.calibration}, n={ps.n_calibration})"


def changed_points(new_spec: artifact.ModelSpec, old_spec: artifact.ModelSpec, version: str) -> dict:
    """{product: {"version", "threshold", "how", "threshold_old"}} where `new_spec`'s threshold is not `old_spec`'s
    (products only in `new_spec` too: an added product has no old point)."""
    out = {}
    for p, ps in new_spec.products.items():
        old = old_spec.products.get(p)
        if old is None or old.threshold != ps.threshold:
            out[p] = {"version": version, "threshold": ps.threshold, "how": how(ps),
                      "threshold_old": old.threshold if old else None}
    return out


def candidate_points(deployment: str, scoring_version: str, alias: str = "candidate") -> dict:
    """The operating points of the version behind `alias` where they differ from `scoring_version`'s: what the
    night's report shows beside the night's own. {} when there is no such alias or it is the same version."""
    from pipeline.errors import NotFoundError
    try:
        cand = registry.get_version(deployment, alias=alias)
        if str(cand.version) == str(scoring_version):
            return {}
        scoring = registry.get_version(deployment, version=scoring_version)
    except NotFoundError:
        return {}
    return changed_points(version_spec(cand), version_spec(scoring), str(cand.version))


def lineage_of(deployment: str, version: str) -> str:
    """A version's lineage line (`v1 train` for a trained version), "" when the registry does not know it."""
    from pipeline.errors import NotFoundError
    try:
        mv = registry.get_version(deployment, version=version)
    except NotFoundError:
        return ""
    return (mv.tags or {}).get("lineage") or f"v{mv.version} {(mv.tags or {}).get('operation', 'train')}"
