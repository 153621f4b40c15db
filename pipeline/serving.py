"""A registered version as an MLflow model (``python_function`` flavor): what notebooks, `mlflow models serve`
and `mlflow.pyfunc.spark_udf` load.

The model folder holds MLmodel, this class (pickled by reference), a copy of the `pipeline` package
(code_paths) and, under ``artifacts/anople/``, the pipeline's own artifact (model.json, prompts, banks): the
Ray actors read that same folder, so there is one copy of the banks.

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


class AnoPLePyfunc(mlflow.pyfunc.PythonModel):
    """Scores image bytes with the version's scorer (CPU, or the GPU where there is one)."""

    batch_size = 16

    def load_context(self, context) -> None:
        from pipeline.nightly.scorer import Scorer
        self.scorer = Scorer.load(context.artifacts[ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from pipeline.sources.images import ImageDecodeError, decode_scaled, to_model_input

        n = len(model_input)
        products = [None if p is None else str(p) for p in model_input["product"]]
        ids = list(model_input["image_id"]) if "image_id" in model_input else [None] * n
        score, status, error = np.full(n, np.nan), ["ok"] * n, [""] * n
        S = self.scorer.model.image_size
        pixels = {}
        for i, (data, product) in enumerate(zip(model_input["image"], products)):
            if product not in self.scorer.banks:
                status[i], error[i] = "error", f"unknown product {product!r}: the model knows {', '.join(sorted(self.scorer.banks))}"
                continue
            try:
                pixels[i] = to_model_input(decode_scaled(_as_bytes(data), S)[0], S)
            except ImageDecodeError as e:
                status[i], error[i] = "error", str(e)
        todo = sorted(pixels)
        for k in range(0, len(todo), self.batch_size):
            rows = todo[k:k + self.batch_size]
            s, _ = self.scorer.score(np.stack([pixels[i] for i in rows]), [products[i] for i in rows])
            score[rows] = s
        threshold = np.array([self.scorer.thresholds.get(p, np.nan) for p in products], dtype=np.float64)
        rows = score_rows({"image_id": np.array(ids, dtype=object), "product": np.array(products, dtype=object)},
                          SERVING, score=score, threshold=threshold, status=status, error=error)
        return pd.DataFrame({c: _or_null(rows[c]) if c in ("score", "threshold") else rows[c] for c in SERVED})


def _or_null(values: np.ndarray) -> pd.Series:
    """Floats with None where there is no number: `mlflow models serve` writes a float column's NaN as a bare
    NaN, which is not JSON (RFC 8259) and fails strict parsers (JavaScript's JSON.parse, Go, Jackson) on the
    whole answer; None is written as null. In pandas the column is object dtype (`.astype(float)` gives NaN)."""
    return pd.Series([float(v) if np.isfinite(v) else None for v in values], dtype=object)


def _as_bytes(data) -> bytes | None:
    """Image bytes as pandas hands them over (bytes, bytearray, memoryview, or None)."""
    return None if data is None else bytes(data)


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


def log_model(artifact_dir: str):
    """Log the pipeline artifact in `artifact_dir` as this run's MLflow model "anople". Returns ModelInfo."""
    package = os.path.dirname(os.path.abspath(__file__))  # the pipeline package: importable wherever it loads
    with tempfile.TemporaryDirectory() as tmp:
        # MLflow stores an artifact folder under its own base name: name it, so it lands at artifacts/anople
        named = shutil.copytree(artifact_dir, os.path.join(tmp, ARTIFACT))
        return mlflow.pyfunc.log_model(name=ARTIFACT, python_model=AnoPLePyfunc(), artifacts={ARTIFACT: named},
                                       code_paths=[package], signature=SIGNATURE, pip_requirements=requirements())
