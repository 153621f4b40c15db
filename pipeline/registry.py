"""MLflow tracking and model registry: one registered model ``anople-<deployment>`` per deployment,
versions moved between aliases (``candidate``, ``production``), never the deprecated stages.

The store comes from MLFLOW_TRACKING_URI; by default sqlite under the local root (ANOPLE_ROOT, default
./anople-root), with artifacts in ANOPLE_ARTIFACT_ROOT (may be s3://; default: a tracking server's own
artifact store, else <root>/mlartifacts).
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from pipeline import artifact, storage
from pipeline.errors import NotFoundError, RefusedError
from pipeline.model.config import AnoPLeConfig

RANDOM_WEIGHTS_BANNER = (
    "WARNING: RANDOM-INIT BACKBONE. This model's CLIP weights are random, not pretrained: its scores "
    "are meaningless for real inspection. Train with real weights (--weights <tag|file|s3://...>) for production.")


def local_root() -> str:
    return os.path.abspath(os.environ.get("ANOPLE_ROOT", "anople-root"))


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    os.makedirs(local_root(), exist_ok=True)
    return f"sqlite:///{os.path.join(local_root(), 'mlflow.db')}"


def connect():
    """The mlflow module, pointed at this deployment's tracking store (read from the environment on
    every call: tests and jobs switch stores between calls)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


class RunLog:
    """A job's MLflow run, the one way the pipeline writes to one: params, metrics, tags and artifacts."""

    def __init__(self, run_id: str):
        self.id = run_id

    def params(self, values: dict) -> None:
        mlflow.log_params(values)

    def metrics(self, values: dict, step: int | None = None) -> None:
        mlflow.log_metrics(values, step=step)

    def tags(self, values: dict) -> None:
        mlflow.set_tags(values)

    def json(self, value, path: str) -> None:
        """A dict or list as a JSON artifact at `path`."""
        mlflow.log_dict(value, path)

    def text(self, value: str, path: str) -> None:
        mlflow.log_text(value, path)

    def figure(self, fig, path: str) -> None:
        mlflow.log_figure(fig, path)

    def image(self, image, path: str) -> None:
        mlflow.log_image(image, path)

    def table(self, columns: dict, path: str) -> None:
        """Columns as a table artifact the MLflow UI shows (it appends when the path exists)."""
        mlflow.log_table(columns, path)


@contextlib.contextmanager
def run(deployment: str | None = None, name: str | None = None, run_id: str | None = None) -> Iterator[RunLog]:
    """A new run named `name` in the deployment's experiment, or the run `run_id` reopened; ended (FINISHED, or
    FAILED when the block raises) on leaving the block."""
    connect()
    where = {"run_id": run_id} if run_id else {"experiment_id": experiment_id(deployment), "run_name": name}
    with mlflow.start_run(**where) as active:
        yield RunLog(active.info.run_id)


def log_epoch(tracking_uri: str, run_id: str, metrics: dict, step: int) -> None:
    """Metrics into a run from another process (a training worker) while the run is open in the driver."""
    MlflowClient(tracking_uri=tracking_uri).log_batch(run_id, metrics=[
        Metric(k, float(v), int(time.time() * 1000), step) for k, v in metrics.items()])


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=connect().get_tracking_uri())


def config_params(cfg: AnoPLeConfig) -> dict[str, str]:
    """Every knob and ablation switch of the typed config as MLflow params ``anople.<knob>``."""
    return {f"anople.{k}": ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
            for k, v in cfg.to_dict().items() if k != "class_names"}  # those: class_name.<product> per product


def _filter(tags: dict[str, str], status: str) -> str:
    return " and ".join([f"tags.{k} = '{v}'" for k, v in tags.items()] + [f"attributes.status = '{status}'"])


def running_runs(experiment: str, tags: dict[str, str]) -> set[str]:
    """Ids of the experiment's runs with these tags that MLflow still shows RUNNING."""
    return {r.info.run_id for r in client().search_runs([experiment], _filter(tags, "RUNNING"), max_results=1000)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_run(run_id: str, reason: str) -> None:
    """Mark a run that shows RUNNING but is over FAILED, with the reason as its `failure` tag."""
    c = client()
    c.set_tag(run_id, "failure", reason)
    c.set_terminated(run_id, status="FAILED")


def fail_dead_runs(experiment: str, tags: dict[str, str], current: str, stale_after_h: float = 24.0) -> list[str]:
    """Mark FAILED the runs with these tags that still show RUNNING but whose process is gone (same host,
    pid not alive) or that started more than `stale_after_h` hours ago: a killed job cannot mark itself.
    Returns their ids."""
    c = client()
    now_ms = time.time() * 1000
    failed = []
    for r in c.search_runs([experiment], _filter(tags, "RUNNING"), max_results=1000):
        if r.info.run_id == current:
            continue
        t = r.data.tags
        gone = t.get("host") == socket.gethostname() and t.get("pid", "").isdigit() and not _alive(int(t["pid"]))
        old = now_ms - r.info.start_time > stale_after_h * 3600e3
        if gone or old:
            c.set_tag(r.info.run_id, "failure", "process gone (killed)" if gone else f"running over {stale_after_h} h")
            c.set_terminated(r.info.run_id, status="FAILED")
            failed.append(r.info.run_id)
    return failed


def model_name(deployment: str) -> str:
    return f"anople-{deployment}"


SERVER_SCHEMES = ("http", "https", "databricks")  # tracking URIs of a server, which has its own artifact store


def experiment_id(deployment: str) -> str:
    """The deployment's experiment. Its artifact root: ANOPLE_ARTIFACT_ROOT when set; else, behind a tracking
    server, the server's own (`mlflow-artifacts:/` with --artifacts-destination, or its --default-artifact-root),
    which every node reaches; else <root>/mlartifacts (a local store's default would be ./mlruns of whatever
    folder the job ran in)."""
    connect()
    name = f"anople-{deployment}"
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = os.environ.get("ANOPLE_ARTIFACT_ROOT")
    if not root and tracking_uri().split(":", 1)[0].lower() in SERVER_SCHEMES:
        return mlflow.create_experiment(name)
    root = root or os.path.join(local_root(), "mlartifacts")
    if not storage.is_remote(root):
        root = os.path.abspath(root)
    return mlflow.create_experiment(name, artifact_location=root)


PIPELINE_DIR = "artifacts/anople"  # the pipeline's artifact inside a version's MLflow model folder


def register(deployment: str, run_id: str, model_id: str, tags: dict[str, str]):
    """New version of the deployment's model from a logged MLflow model (pipeline.serving); alias
    'candidate' moves to it. The version's source is the model folder's storage URI, so the pipeline's
    actors and MLflow's own loaders read the same files."""
    c = client()
    name = model_name(deployment)
    if c.search_registered_models(filter_string=f"name = '{name}'") == []:
        c.create_registered_model(name, description=f"AnoPLe model for deployment {deployment}")
    source = mlflow.get_logged_model(model_id).artifact_location
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=tags | {"layout": "mlflow-pyfunc"},
                                model_id=model_id)
    c.set_registered_model_alias(name, "candidate", mv.version)
    return c.get_model_version(name, mv.version)


def get_version(deployment: str, version: str | int | None = None, alias: str | None = None):
    """A model version by number or alias, with a clear error when there is none."""
    c = client()
    name = model_name(deployment)
    try:
        if version is not None:
            return c.get_model_version(name, str(version))
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        which = f"version {version}" if version is not None else f"alias {alias!r}"
        raise NotFoundError(f"registered model {name!r} has no {which} (tracking URI "
                            f"{storage.redact(tracking_uri())}): {e.message if hasattr(e, 'message') else e}") from e


class PromotionRefused(RefusedError):
    """The promotion gate said no; the alias did not move."""


EVAL_TAG = "evaluation"  # on a model version: the mean metrics of its last completed evaluation (JSON)


def record_evaluation(mv, mean: dict[str, float], errors: int, extra: dict | None = None) -> None:
    """Mark a version as evaluated (what the promotion gate asks for), with its mean metrics (and `extra`, e.g.
    its recall on the plant's confirmed defects)."""
    summary = {k: round(float(v), 6) for k, v in (mean | (extra or {})).items()} | {"errors": errors}
    client().set_model_version_tag(mv.name, mv.version, EVAL_TAG, json.dumps(summary, sort_keys=True))


def evaluation_of(mv) -> dict | None:
    text = mv.tags.get(EVAL_TAG)
    return json.loads(text) if text else None


def promote(deployment: str, to_alias: str, version: str | int | None = None, from_alias: str | None = None,
            force: bool = False):
    """Point `to_alias` at a version. Refused, unless `force`, for a random-init backbone or a version with no
    completed evaluation. The version is resolved once, so a training run moving `from_alias` meanwhile does
    not change what is promoted."""
    mv = get_version(deployment, version=version, alias=from_alias)
    reasons = []
    if mv.tags.get("weights_kind") == "random":
        reasons.append("its backbone weights are random-init (tag weights_kind=random): retrain with real weights")
    if evaluation_of(mv) is None:
        reasons.append(f"it has no completed evaluation: run jobs.evaluate --model-alias {from_alias or 'candidate'} "
                       "on it first" if from_alias else "it has no completed evaluation: evaluate it first")
    if evaluation_of(mv) is not None:
        reasons += real_defect_regression(deployment, mv, to_alias)
    if reasons and not force:
        raise PromotionRefused(f"refusing to promote {model_name(deployment)} version {mv.version} to {to_alias!r}: "
                               + "; ".join(reasons) + ". Or pass --force.")
    c = client()
    c.set_registered_model_alias(model_name(deployment), to_alias, mv.version)
    c.set_model_version_tag(model_name(deployment), mv.version, f"promoted_to_{to_alias}", "forced" if force else "gated")
    return c.get_model_version(model_name(deployment), mv.version)


def real_defect_regression(deployment: str, mv, to_alias: str) -> list[str]:
    """The gate on the plant's own defects: a version whose evaluation caught fewer of the inspector-confirmed
    defects (image-level recall, pipeline.evaluation.run.real_defect_recall) than the version now holding
    `to_alias` is refused; [] when either has no such figure or it did not drop."""
    try:
        current = get_version(deployment, alias=to_alias)
    except NotFoundError:
        return []
    new, old = (evaluation_of(mv) or {}).get("real_defect_recall"), (evaluation_of(current) or {}).get("real_defect_recall")
    if new is None or old is None or str(current.version) == str(mv.version) or new >= old:
        return []
    return [f"its recall on the plant's confirmed defects is {100 * new:.1f} %, below version {current.version}'s "
            f"{100 * old:.1f} % ({to_alias})"]


def model_source(mv) -> str:
    """Where the registry says a version's artifact folder is, in a form any node can use: a storage URI
    (local path or s3://) as is, else the tracking server's URI (e.g. mlflow-artifacts:/...), which each
    process fetches for itself with `materialize`. Never a path local to this machine's temp folder."""
    src = mv.source
    src = src[len("file://"):] if src.startswith("file://") else src
    # a pyfunc model folder holds the pipeline's artifact under artifacts/anople (earlier versions: the folder)
    return src.rstrip("/") + "/" + PIPELINE_DIR if mv.tags.get("layout") == "mlflow-pyfunc" else src


_FETCHED: dict[str, str] = {}
# `models:/<name>/<number>` names one immutable version; an alias or `latest` moves between nights
_PINNED_MODEL = re.compile(r"^models:/[^/@]+/\d+(/|$)")
CACHE_UNUSED_DAYS = 7.0


def model_cache_dir() -> str:
    """This node's folder of fetched model versions (ANOPLE_MODEL_CACHE, default <tmp>/anople-models-<uid>, 0700)."""
    return os.environ.get("ANOPLE_MODEL_CACHE") or storage.user_temp("anople-models")


def _prune_cache(cache: str, keep: str) -> None:
    """Remove fetched versions no process on this node has asked for in CACHE_UNUSED_DAYS (each use touches its
    folder), and partial downloads as old: the cache stays bounded by the versions in use, night after night."""
    cutoff = time.time() - CACHE_UNUSED_DAYS * 86400
    for entry in os.scandir(cache):
        if entry.path != keep and entry.is_dir(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry.path, ignore_errors=True)  # a concurrent pruner may have taken it first


def _fetch_into(cache: str, final: str, uri: str) -> None:
    """Download `uri` into a partial folder of the cache and rename it to `final` when whole."""
    partial = tempfile.mkdtemp(prefix=".partial-", dir=cache)
    try:
        fetched = connect().artifacts.download_artifacts(artifact_uri=uri, dst_path=partial)
        with open(os.path.join(partial, "source.json"), "w") as f:  # what this folder is, for whoever looks
            json.dump({"uri": uri, "tracking_uri": storage.redact(tracking_uri()),
                       "path": os.path.relpath(fetched, partial)}, f)
        os.rename(partial, final)  # atomic; fails if another process got there first, and theirs is as good
    except OSError:
        if not os.path.isdir(final):
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def materialize(uri: str) -> str:
    """A model folder the storage layer reads: a storage URI as is; a tracking-server URI fetched into this
    node's model cache once (every actor and every night on the node reuses it; a fetch that dies leaves only a
    partial folder, never a half-written version). A moving reference (`models:/m@alias`) is fetched fresh for
    each process and deleted when it exits."""
    if storage.is_storage_uri(uri):
        return uri
    if uri in _FETCHED:
        return _FETCHED[uri]
    if uri.startswith("models:/") and not _PINNED_MODEL.match(uri):
        dst = tempfile.mkdtemp(prefix="anople-model-")
        atexit.register(shutil.rmtree, dst, True)
        _FETCHED[uri] = connect().artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
        return _FETCHED[uri]
    cache = storage.private_dir(model_cache_dir())  # this user's only: what is in it is loaded as a model
    # one folder per (tracking server, URI): artifact URIs of registered versions are never rewritten
    key = hashlib.sha256(f"{tracking_uri()}\n{uri}".encode()).hexdigest()[:24]
    final = os.path.join(cache, key)
    for attempt in (1, 2):
        if not os.path.isdir(final):
            _fetch_into(cache, final, uri)
        try:
            os.utime(final)  # in use: the pruner keeps it
            with open(os.path.join(final, "source.json")) as f:
                _FETCHED[uri] = os.path.normpath(os.path.join(final, json.load(f)["path"]))
            break
        except FileNotFoundError:  # another process pruned it between the check and the touch: fetch again
            if attempt == 2:
                raise
    _prune_cache(cache, keep=final)
    return _FETCHED[uri]


def artifact_uri(mv) -> str:
    """A version's artifact folder, readable here (fetched into this process's node if need be)."""
    return materialize(model_source(mv))


def metric_key(name: str) -> str:
    """MLflow metric keys allow alphanumerics, _ - . / and space; anything else becomes '_'."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def resolve(deployment: str, alias: str):
    """(version, its model source for the actors, its spec): actors fetch the source on their own node."""
    mv = get_version(deployment, alias=alias)
    uri = model_source(mv)
    return mv, uri, artifact.load_spec(materialize(uri), artifact_sha256(mv))


def artifact_sha256(mv) -> str | None:
    """The SHA-256 of the version's manifest.json recorded at registration (None for versions from before)."""
    return (mv.tags or {}).get("artifact_sha256") or None
