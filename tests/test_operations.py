"""The operations' pure parts: the labels file's checks, the bank's coreset bound, the drift test."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UsageError
from pipeline.nightly import drift
from pipeline.operations.feedback import coreset, read_labels, sort_verdicts


def test_verdicts_are_never_guessed(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("image_id,verdict,note,date\na,normal,,\nb,DEFECT,,2026-11-03\nc,maybe,,\n,normal,,\na,normal,again,\n"
                 "d,normal,,\nd,defect,,\ne,normal,,3.11.2026\n")
    rows, _ = read_labels(str(f))
    usable, problems = sort_verdicts(rows)
    assert usable == {("a", None): "normal", ("b", "2026-11-03"): "defect"}
    assert "row 9: e: date '3.11.2026' is not YYYY-MM-DD" in problems
    text = "\n".join(problems)
    assert "row 4: c: unknown verdict 'maybe'" in text and "row 5: no image_id" in text
    assert "row 6: a: repeated" in text and "d: both verdicts given: not used" in text


def test_labels_in_parquet_and_a_file_without_verdicts(tmp_path):
    pq.write_table(pa.table({"image_id": ["x"], "verdict": ["normal"], "date": ["2026-11-03"]}), tmp_path / "l.parquet")
    rows, raw = read_labels(str(tmp_path / "l.parquet"))
    assert rows == [{"image_id": "x", "verdict": "normal", "date": "2026-11-03", "note": None}] and raw[:4] == b"PAR1"
    (tmp_path / "typed.csv").write_text("Image ID, Verdict\n007,Normal\n")
    rows, _ = read_labels(str(tmp_path / "typed.csv"))
    assert rows == [{"image_id": "007", "verdict": "Normal", "date": None, "note": None}]
    assert sort_verdicts(rows)[0] == {("007", None): "normal"}
    (tmp_path / "bad.csv").write_text("image_id,label\nx,1\n")
    with pytest.raises(UsageError, match="no column verdict"):
        read_labels(str(tmp_path / "bad.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UsageError, match="is empty"):
        read_labels(str(tmp_path / "empty.csv"))
    with pytest.raises(UsageError, match="does not exist"):
        read_labels(str(tmp_path / "missing.csv"))


def test_the_feedback_coreset_keeps_its_bound_and_covers_what_it_drops():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 8))
    feats = np.concatenate([c + 0.01 * rng.normal(size=(40, 8)) for c in centres])  # 5 tight clusters
    keep = coreset(feats, 5)
    assert len(keep) == 5 and len(set(keep.tolist())) == 5
    assert sorted({int(i) // 40 for i in keep}) == [0, 1, 2, 3, 4]  # one per cluster: nothing left uncovered
    assert (coreset(feats[:3], 5) == np.arange(3)).all()


def test_drift_flags_a_shifted_distribution_not_a_like_one():
    rng = np.random.default_rng(1)
    base = rng.normal(0.2, 0.03, 200).tolist()
    dist = {"products": {
        "same": {"scored": 100, "alarms": 0, "presumed_normal": 100, "scores": rng.normal(0.2, 0.03, 100).tolist()},
        "moved": {"scored": 100, "alarms": 2, "presumed_normal": 98, "scores": rng.normal(0.3, 0.03, 98).tolist()},
        "alarming": {"scored": 20, "alarms": 15, "presumed_normal": 5, "scores": [0.2] * 5},
        "few": {"scored": 3, "alarms": 0, "presumed_normal": 3, "scores": [0.2, 0.3, 0.4]}}}
    cal = {p: base for p in dist["products"]}
    r = drift.test_night(dist, cal, {})
    assert not r["same"]["flagged"] and r["moved"]["flagged"] and r["alarming"]["flagged"] and not r["few"]["flagged"]
    ks = r["moved"]["tests"][0]
    assert ks["test"] == "ks_2samp" and ks["statistic"] > 0.8 and ks["p_value"] < drift.ALPHA
    assert "not tested" in r["few"]["tests"][0]["note"] and r["same"]["tests"][1]["note"].startswith("not tested")
    assert [line.split(":")[0] for line in drift.describe(r)] == ["alarming", "moved"]
