"""The score row's one home: its constructors and the serving signature derived from its schema."""
import numpy as np
import pyarrow as pa

from pipeline.nightly.score_table import SCORE_SCHEMA, RunInfo, error_rows, score_rows, to_table

INFO = RunInfo("d", "anople-d", "3", "run-1")
BATCH = {"image_id": np.array(["a", "b", "c"], dtype=object), "product": np.array(["tile"] * 3, dtype=object)}


def test_an_error_row_has_no_score_and_is_never_anomalous_whatever_its_caller_passed():
    rows = score_rows(BATCH, INFO, score=[0.9, 0.9, 0.01], threshold=[0.5] * 3, status=["ok", "error", "ok"],
                      error=["", "scoring failed: boom", ""])
    assert np.isnan(rows["score"][1]) and rows["is_anomalous"].tolist() == [True, False, False]
    t = to_table(rows)
    assert t.schema == SCORE_SCHEMA and t["model_version"].to_pylist() == ["3"] * 3
    assert t["score"].to_pylist()[1] is None  # null in the table, as every error row's


def test_error_rows_carry_each_reason_and_the_products_threshold_when_given():
    rows = error_rows(BATCH, INFO, ["x", "y", "z"])
    assert rows["status"].tolist() == ["error"] * 3 and rows["error"].tolist() == ["x", "y", "z"]
    assert np.isnan(rows["score"]).all() and np.isnan(rows["threshold"]).all() and not rows["is_anomalous"].any()
    assert error_rows(BATCH, INFO, ["x"] * 3, threshold=[0.2, 0.2, np.nan])["threshold"][0] == 0.2
    assert to_table(rows).num_rows == 3


def test_the_serving_signature_is_the_score_rows_own_columns_and_types():
    from pipeline.serving import SERVED, SIGNATURE
    out = {c.name: c for c in SIGNATURE.outputs.inputs}
    assert list(out) == list(SERVED)
    kinds = {pa.string(): "string", pa.float64(): "double", pa.bool_(): "boolean"}
    for name, col in out.items():
        assert col.type.name == kinds[SCORE_SCHEMA.field(name).type], name
    assert [n for n, c in out.items() if not c.required] == ["image_id", "score", "threshold"]
