"""A registered version as an MLflow model (``python_function`` flavor): what notebooks, `mlflow models serve`
and `mlflow.pyfunc.spark_udf` load.

The model folder holds MLmodel, the model's code as MLflow's "models from code" (pipeline/serving_model.py: two
lines that import this class from the *installed* pipeline package; no pickled object, no copy of the package
beside the model, so loading runs no code written into the artifact store beyond that file) and, under
``artifacts/anople/``, the pipeline's own artifact (model.json, prompts, banks, manifest.json): the Ray actors
read that same folder, so there is one copy of the banks. The manifest's SHA-256 travels in the MLflow model's
model_config; load_context refuses a folder whose files do not match it (artifact.ModelRefused). The serving
environment must have this project installed (`pip install` of the same version).

Input: a DataFrame with ``image`` (encoded bytes; base64 in a JSON request to `mlflow models serve`),
``product`` and optionally ``image_id``. Output: one row per input row, in order: ``image_id``,
``product``, ``score``, ``is_anomalous``, ``threshold``, ``status`` (ok / error) and ``error``; an error
row (undecodable image, unknown product) has no score (None: null in JSON), as in the nightly scores.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from pipeline.nightly.score_table import SCORE_SCHEMA, RunInfo, score_rows

ARTIFACT = "anople"  # the pipeline's artifact inside the MLflow model: artifacts/anople/
# The score row's columns serving answers with (pipeline.nightly.score_table), in this order; the nullable ones may be
# missing (image_id) or null (no score and no threshold on an error row).
SERVED = ("image_id", "product", "score", "is_anomalous", "threshold", "status", "error")
NULLABLE = ("image_id", "score", "threshold")
_MLFLOW_TYPE = {"string": "string", "double": "double", "bool": "boolean"}  # Arrow type -> MLflow column type
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "product"),
                   ColSpec("string", "image_id", required=False)]),
    outputs=Schema([ColSpec(_MLFLOW_TYPE[str(SCORE_SCHEMA.field(c).type)], c, required=c not in NULLABLE)
                    for c in SERVED]))
_REQUIREMENTS = ("torch", "open_clip_torch", "faiss-cpu", "numpy", "pillow", "safetensors", "pyarrow", "s3fs",
                 "pyyaml", "scipy", "mlflow")


SERVING = RunInfo("", "", "", "")  # serving's rows carry none of the run columns (not in SERVED)


# One request's bounds (documented in README "Serving"): more rows, or more image bytes in all, and every row of the
# request is an error row saying so (split the request); nothing is decoded. Within them, memory is bounded by one
# batch of decodes at a time, whatever the request's size.
MAX_REQUEST_ROWS = int(os.environ.get("ANOPLE_SERVING_MAX_ROWS", 10_000))
MAX_REQUEST_BYTES = int(os.environ.get("ANOPLE_SERVING_MAX_BYTES", 512 * 2**20))


class AnoPLePyfunc(mlflow.pyfunc.PythonModel):
    """Scores image bytes with the version's scorer (CPU, or the GPU where there is one)."""

    batch_size = 16

    def load_context(self, context) -> None:
        from pipeline.nightly.scorer import Scorer
        expected = (context.model_config or {}).get("artifact_sha256")
        self.scorer = Scorer.load(context.artifacts[ARTIFACT], expected_sha256=expected)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """One output row per input row, in order, each with its status: decode and scoring run `batch_size` rows
        at a time (a row that fails, a wrong type or a non-finite score is that row's error, never the request's)."""
        n = len(model_input)
        products = [p if isinstance(p, str) else None for p in model_input["product"]] if "product" in model_input \
            else [None] * n
        ids = [i if isinstance(i, str) else None for i in model_input["image_id"]] if "image_id" in model_input \
            else [None] * n
        images = model_input["image"] if "image" in model_input else pd.Series([None] * n)
        score, status, error = np.full(n, np.nan), ["ok"] * n, [""] * n
        total = sum(len(d) for d in images if isinstance(d, (bytes, bytearray, memoryview)))
        if n > MAX_REQUEST_ROWS or total > MAX_REQUEST_BYTES:
            why = (f"request of {n} rows and {total} image bytes is over the limit of {MAX_REQUEST_ROWS} rows and "
                   f"{MAX_REQUEST_BYTES} bytes per request: send it in parts")
            status, error = ["error"] * n, [why] * n
        else:
            todo = []
            for i, (data, product) in enumerate(zip(images, products)):
                if product not in self.scorer.banks:
                    status[i], error[i] = "error", (f"unknown product {product!r}: the model knows "
                                                    f"{', '.join(sorted(self.scorer.banks))}")
                elif not isinstance(data, (bytes, bytearray, memoryview)):
                    status[i], error[i] = "error", (f"image is {type(data).__name__}, not encoded image bytes "
                                                    "(base64 in a JSON request)")
                else:
                    todo.append(i)
            for k in range(0, len(todo), self.batch_size):
                self._score_batch(todo[k:k + self.batch_size], images, products, score, status, error)
        threshold = np.array([self.scorer.thresholds.get(p, np.nan) for p in products], dtype=np.float64)
        rows = score_rows({"image_id": np.array(ids, dtype=object), "product": np.array(products, dtype=object)},
                          SERVING, score=score, threshold=threshold, status=status, error=error)
        return pd.DataFrame({c: _or_null(rows[c]) if c in ("score", "threshold") else rows[c] for c in SERVED})

    def _score_batch(self, rows: list[int], images, products, score, status, error) -> None:
        """Decode and score these rows (one batch), writing into score/status/error; a batch that fails is scored
        row by row so only the failing row is an error."""
        from pipeline.sources.images import ImageDecodeError, decode_scaled, to_model_input
        S = self.scorer.model.image_size
        pixels = {}
        for i in rows:
            try:
                pixels[i] = to_model_input(decode_scaled(bytes(images.iloc[i]), S)[0], S)  # [3, S, S]
            except ImageDecodeError as e:
                status[i], error[i] = "error", str(e)
        ok = sorted(pixels)
        try:
            groups = [(ok, self.scorer.score(np.stack([pixels[i] for i in ok]), [products[i] for i in ok])[0])] \
                if ok else []
        except Exception:  # isolate the failing row(s)
            groups = []
            for i in ok:
                try:
                    groups.append(([i], self.scorer.score(pixels[i][None], [products[i]])[0]))
                except Exception as e:
                    status[i], error[i] = "error", f"scoring failed: {type(e).__name__}: {e}"
        for idx, s in groups:
            for i, v in zip(idx, s):
                if np.isfinite(v):
                    score[i] = v
                else:
                    status[i], error[i] = "error", f"scoring failed: the model gave a non-finite score ({v})"


def _or_null(values: np.ndarray) -> pd.Series:
    """Floats with None where there is no number: `mlflow models serve` writes a float column's NaN as a bare
    NaN, which is not JSON (RFC 8259) and fails strict parsers (JavaScript's JSON.parse, Go, Jackson) on the
    whole answer; None is written as null. In pandas the column is object dtype (`.astype(float)` gives NaN)."""
    return pd.Series([float(v) if np.isfinite(v) else None for v in values], dtype=object)


def requirements() -> list[str]:
    """The serving environment's pins: the versions installed here (explicit, so logging the model never
    runs MLflow's requirement inference, which would load it)."""
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return out


MODEL_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serving_model.py")


def log_model(artifact_dir: str, artifact_sha256: str | None = None):
    """Log the pipeline artifact in `artifact_dir` (with its manifest, artifact.write_manifest) as this run's MLflow
    model "anople", as models from code. Returns ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        # MLflow stores an artifact folder under its own base name: name it, so it lands at artifacts/anople
        named = shutil.copytree(artifact_dir, os.path.join(tmp, ARTIFACT))
        return mlflow.pyfunc.log_model(name=ARTIFACT, python_model=MODEL_CODE, artifacts={ARTIFACT: named},
                                       model_config={"artifact_sha256": artifact_sha256 or ""},
                                       signature=SIGNATURE, pip_requirements=requirements())


def load_registered(deployment: str, alias: str = "production"):
    """The version behind `alias` as an MLflow pyfunc model, its files checked against the SHA-256 the *registry*
    recorded (the version's tag), not only the one in the model folder's MLmodel: whoever can write the artifact
    store can rewrite MLmodel too, not the registry. What notebooks should call."""
    from pipeline import registry
    registry.connect()
    mv = registry.get_version(deployment, alias=alias)
    digest = registry.artifact_sha256(mv)
    return mlflow.pyfunc.load_model(f"models:/{mv.name}/{mv.version}",
                                    model_config={"artifact_sha256": digest} if digest else None)
