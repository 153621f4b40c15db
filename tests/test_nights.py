"""Atomic nights: what the standard readers see of a night before, during and after a publish, on local
storage and on an S3 API."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline import storage
from pipeline.nightly import nights

SCHEMA = pa.schema([("image_id", pa.string()), ("score", pa.float64())])


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("bucket")
    return f"s3://anople-test/nights-{tmp_path.name}"


def _rows(prefix, n):
    return pa.table({"image_id": [f"{prefix}/{i}" for i in range(n)], "score": np.arange(n, dtype=float)},
                    schema=SCHEMA)


def _visible(output):
    """The night as a standard reader sees it: pyarrow.dataset on the folder (pandas and DuckDB skip the
    same '_'/'.' names)."""
    fs, path = storage.arrow_filesystem(nights.Night(output, "d", "2026-11-22").uri)
    try:
        return sorted(pads.dataset(path, filesystem=fs, format="parquet").to_table()["image_id"].to_pylist())
    except FileNotFoundError:
        return []


def _publish(output, run, n):
    w = nights.Night(output, "d", "2026-11-22").writer(run, SCHEMA)
    w.write(_rows(run, n))
    return w, w.publish({"heatmaps": "h"})


def test_a_publish_switches_the_whole_night_and_names_its_run(output):
    _, marker = _publish(output, "run1", 3)
    assert _visible(output) == ["run1/0", "run1/1", "run1/2"]
    assert nights.Night(output, "d", "2026-11-22").published()["run_id"] == "run1" and marker["rows"] == 3
    w = nights.Night(output, "d", "2026-11-22").writer("run2", SCHEMA)
    w.write(_rows("run2", 2))
    assert _visible(output) == ["run1/0", "run1/1", "run1/2"]  # during a run: the previous night, whole
    w.write(_rows("run2b", 1))
    w.publish({})
    assert _visible(output) == ["run2/0", "run2/1", "run2b/0"]  # after: the new night, whole
    assert nights.Night(output, "d", "2026-11-22").published()["run_id"] == "run2"


def test_an_aborted_run_leaves_the_previous_night(output):
    _publish(output, "run1", 2)
    w = nights.Night(output, "d", "2026-11-22").writer("run2", SCHEMA)
    w.write(_rows("run2", 5))
    w.abort()  # a killed or failed run: the night as it was, its rows committed for a rerun to adopt
    night = nights.Night(output, "d", "2026-11-22")
    assert _visible(output) == ["run1/0", "run1/1"] and night.runs_with_files() == {"run2"}
    assert len(night.parts("run2")) == 1
    w = night.writer("run3", SCHEMA)
    w.write(_rows("run3", 5))
    w.abort(discard=True)
    assert _visible(output) == ["run1/0", "run1/1"] and night.runs_with_files() == {"run2"}


def test_pandas_reads_the_scores_tree(tmp_path):
    out = str(tmp_path / "out")
    _publish(out, "run1", 2)
    w = nights.Night(out, "d", "2026-11-22").writer("run2", SCHEMA)  # a run in flight: its staging file exists
    w.write(_rows("run2", 4))
    w.commit()
    df = pd.read_parquet(storage.join(out, "scores"))
    assert sorted(df["image_id"]) == ["run1/0", "run1/1"]


def test_a_publish_replaces_the_part_files_of_the_old_layout(tmp_path):
    import pyarrow.parquet as pq
    out = str(tmp_path / "out")
    night = tmp_path / "out" / "scores" / "deployment=d" / "date=2026-11-22"
    night.mkdir(parents=True)
    pq.write_table(_rows("old", 2), night / "7_000000_000000.parquet")
    _publish(out, "run1", 1)
    assert _visible(out) == ["run1/0"] and sorted(p.name for p in night.iterdir()) == ["_SUCCESS", "scores.parquet"]


def test_run_files_are_found_and_removed_per_run(output):
    storage.write_bytes(storage.join(nights.Night(output, "d", "2026-11-22").heatmap_prefix("r1"), "a.png"), b"png")
    storage.write_bytes(storage.join(nights.Night(output, "d", "2026-11-22").heatmap_prefix("r2"), "a.png"), b"png")
    nights.Night(output, "d", "2026-11-22").writer("r3", SCHEMA).write(_rows("r3", 1))
    assert nights.Night(output, "d", "2026-11-22").runs_with_files() == {"r1", "r2", "r3"}
    nights.Night(output, "d", "2026-11-22").remove_run_files("r1")
    assert nights.Night(output, "d", "2026-11-22").runs_with_files() == {"r2", "r3"}


@pytest.mark.parametrize("image_id", ["a/b", "x" * 300, "é/" * 200, "%41", "../../etc/passwd"])
def test_heatmap_keys_are_valid_file_names_for_any_image_id(image_id, tmp_path):
    key = nights.heatmap_key(image_id)
    assert key.endswith(".png") and "/" not in key and len(key.encode()) <= 255
    (tmp_path / key).write_bytes(b"ok")  # the filesystem takes it
    assert nights.heatmap_key(image_id) == key
    assert len({nights.heatmap_key(image_id + s) for s in ("", "1", "2")}) == 3


def test_every_reader_sees_the_whole_tree_with_one_type_per_column(tmp_path):
    """pandas, pyarrow (hive) and DuckDB's recursive glob on scores/: two published partitions, a run in
    flight on one of them, the partition columns from the path with one type, nothing twice."""
    import duckdb

    out = str(tmp_path / "out")
    _publish(out, "run1", 2)
    w = nights.Night(out, "e", "2026-11-23").writer("run2", SCHEMA)
    w.write(_rows("run2", 3))
    w.publish({"heatmaps": "h"})
    inflight = nights.Night(out, "d", "2026-11-22").writer("run3", SCHEMA)
    inflight.write(_rows("run3", 5))
    inflight.commit()  # a whole staging part on disk, not yet published
    tree = storage.join(out, "scores")
    expect = [("d", "run1/0"), ("d", "run1/1"), ("e", "run2/0"), ("e", "run2/1"), ("e", "run2/2")]
    df = pd.read_parquet(tree)
    assert sorted(zip(df["deployment"].astype(str), df["image_id"])) == expect
    t = pads.dataset(tree, format="parquet", partitioning="hive").to_table()
    assert sorted(zip(t["deployment"].to_pylist(), t["image_id"].to_pylist())) == expect
    assert pa.types.is_string(t.schema.field("deployment").type)
    rows = duckdb.sql(f"select deployment, image_id, date from read_parquet('{tree}/**/*.parquet', "
                      "hive_partitioning=true) order by deployment, image_id").fetchall()
    assert [(d, i) for d, i, _ in rows] == expect and {str(r[2]) for r in rows} == {"2026-11-22", "2026-11-23"}


FULL = pa.schema([("image_id", pa.string()), ("score", pa.float64()), ("status", pa.string()),
                  ("error", pa.string()), ("is_anomalous", pa.bool_()), ("run_id", pa.string())])
KEY = {"model_version": "3", "heatmap_side": 240}


def _scored(run, ids, error=None):
    n = len(ids)
    return pa.table({"image_id": ids, "score": np.arange(n, dtype=float), "status": ["error" if error else "ok"] * n,
                     "error": [error] * n, "is_anomalous": [False] * n, "run_id": [run] * n}, schema=FULL)


def test_a_killed_run_commits_whole_parts_and_a_rerun_adopts_them_each_once(output, monkeypatch):
    """Issue 24, item 4: a night killed part-way keeps what it committed; the rerun scores only the rest."""
    monkeypatch.setenv("ANOPLE_STAGE_ROWS", "4")
    night = nights.Night(output, "d", "2026-11-22")
    ids = [f"img/{i}" for i in range(10)]
    killed = night.writer("r1", FULL, KEY)
    for i in ids[:7]:
        killed.write(_scored("r1", [i]))
    killed._end()  # SIGKILL: no abort, no commit of the 3 buffered rows
    assert len(night.parts("r1")) == 1 and night.run_record("r1")["key"] == KEY
    plan = nights.plan_resume(night, KEY, {"r1"}, ("infra",))
    assert plan.rows == 4 and plan.image_ids == set(ids[:4]) and plan.runs == ["r1"]
    rerun = night.writer("r2", FULL, KEY, plan)
    rerun.write(_scored("r2", ids[4:]))
    marker = rerun.publish({})
    t = pads.dataset(storage.arrow_filesystem(night.uri)[1], filesystem=storage.arrow_filesystem(night.uri)[0],
                     format="parquet").to_table()
    assert sorted(t["image_id"].to_pylist()) == ids  # 0 lost, 0 twice
    assert dict(zip(t["image_id"].to_pylist(), t["run_id"].to_pylist()))["img/0"] == "r1"  # who scored it
    assert marker["resumed_from"] == ["r1"] and marker["resumed_rows"] == 4 and marker["rows"] == 10
    assert "r2" not in night.runs_with_files()  # the publisher's staging is gone


def test_a_rerun_adopts_nothing_of_another_key_nor_infrastructure_failures(output, monkeypatch):
    monkeypatch.setenv("ANOPLE_STAGE_ROWS", "2")
    night = nights.Night(output, "d", "2026-11-22")
    a = night.writer("ra", FULL, KEY)
    a.write(_scored("ra", ["x/0", "x/1"]))
    a.write(_scored("ra", ["x/2", "x/3"], error="scoring failed: the device fell over"))
    a.write(_scored("ra", ["x/4", "x/5"], error="cannot decode image: truncated"))
    a.abort()
    b = night.writer("rb", FULL, KEY | {"model_version": "4"})
    b.write(_scored("rb", ["x/0", "x/1"]))
    b.abort()
    plan = nights.plan_resume(night, KEY, {"ra", "rb"}, ("scoring failed",))
    # ra's ok rows and its bad image (the same answer again) are adopted; its infrastructure failures are not
    assert plan.image_ids == {"x/0", "x/1", "x/4", "x/5"} and plan.counts["ok"] == 2 and plan.counts["error"] == 2
    assert plan.runs == ["ra"] and "model_version ('4', now '3')" in plan.refused["rb"]


def test_a_part_cut_short_is_not_adopted(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOPLE_STAGE_ROWS", "2")
    night = nights.Night(str(tmp_path / "out"), "d", "2026-11-22")
    w = night.writer("r1", FULL, KEY)
    w.write(_scored("r1", ["a", "b"]))
    w.abort()
    good = night.parts("r1")[0]
    with open(good.replace("part-00000", "part-00001"), "wb") as f:
        f.write(open(good, "rb").read()[:40])  # a file whose writer stopped half-way
    plan = nights.plan_resume(night, KEY, {"r1"}, ())
    assert plan.image_ids == {"a", "b"} and plan.parts["r1"] == [good]


def test_rows_a_failed_stream_left_run_again_only_when_the_night_allows_it():
    """Issue 24, item 2: a lost node can take one of Ray Data's own actors (its parquet footer reader) with it,
    which Ray does not retry: the night runs the rows the stream had not yet given again, each row once."""
    from pipeline.nightly.stages import isolating

    ids = [f"r{i}" for i in range(6)]
    calls = []

    def build(subset, restarts):
        calls.append((subset, restarts))
        rows = ids if subset is None else list(subset)
        for i, r in enumerate(rows):
            if len(calls) == 1 and i == 2:
                raise RuntimeError("the actor's node has died")
            yield pa.table({"image_id": [r]})

    asked = []
    out = [t["image_id"][0].as_py() for t in isolating(build, lambda: ids, None,
                                                        retry_after=lambda e, left: asked.append(left) or True)]
    assert out == ids and asked == [4] and calls[1] == (tuple(ids[2:]), calls[0][1])  # the rest, whole, same restarts
    calls.clear()
    with pytest.raises(RuntimeError, match="node has died"):  # no node lost: the night's failure
        list(isolating(build, lambda: ids, None, retry_after=lambda e, left: False))
