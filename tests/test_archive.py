"""The one way to list and filter a partition: pyarrow here, and the same filter through Ray Data's reader."""
import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import NotFoundError, UsageError
from pipeline.sources import archive

ROWS = [("t/0", "tile", "train"), ("t/1", "tile", "test"), ("t2/0", "tile-2", "test"), ("w/0", "washer", "test"),
        ("x/0", None, "test")]


@pytest.fixture
def arch(tmp_path):
    part = tmp_path / "deployment=d" / "date=2026-11-22"
    part.mkdir(parents=True)
    rows = [{"image_id": i, "product": p, "split": s, "captured_at": dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc),
             "image": b"x", "label": None, "mask": None, "defect": None, "source_uri": i} for i, p, s in ROWS]
    pq.write_table(pa.Table.from_pylist(rows[:3], schema=archive.SCHEMA), part / "part-a-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:], schema=archive.SCHEMA), part / "part-b-00000.parquet")
    return str(tmp_path)


CASES = [
    (archive.Rows(), ["t/0", "t/1", "t2/0", "w/0", "x/0"]),
    (archive.Rows(split="test"), ["t/1", "t2/0", "w/0", "x/0"]),
    (archive.Rows(products=("tile",)), ["t/0", "t/1"]),  # exact names: "tile" is not a prefix of "tile-2"
    (archive.Rows(split="test", products=("tile", "washer"), exclude=True), ["t2/0", "x/0"]),  # null included
]


@pytest.mark.parametrize("rows,ids", CASES)
def test_read_table_filters_by_split_and_exact_products(arch, rows, ids):
    assert sorted(archive.read_table(arch, "d", "2026-11-22", rows, columns=["image_id"])["image_id"].to_pylist()) == ids


@pytest.mark.integration
def test_ray_data_reads_the_same_rows_with_the_same_filter(arch, ray_local):
    from pipeline.nightly.stages import read_rows
    for rows, ids in CASES:
        got = read_rows(archive.Partition(arch, "d", "2026-11-22"), ["image_id"], rows).take_all()
        assert sorted(r["image_id"] for r in got) == ids, rows


def test_partition_queries(arch):
    assert archive.products_in(arch, "d") == ["tile"]  # the products with reference (train) images
    assert archive.product_counts(arch, "d", "2026-11-22") == {"tile": 2, "tile-2": 1, "washer": 1, None: 1}
    assert archive.Partition(arch, "d", "2026-11-22").count_rows() == 5
    with pytest.raises(NotFoundError, match="no archive shards"):
        archive.Partition(arch, "d", "2026-11-23").count_rows()
    with pytest.raises(UsageError):
        archive.partition_uri(arch, "d", "2026-11-31")


def test_a_scheduled_job_names_yesterday_in_its_time_zone():
    import datetime as dt
    from zoneinfo import ZoneInfo

    from pipeline.errors import UsageError
    from pipeline.sources.archive import resolve_date
    for tz in ("UTC", "Pacific/Kiritimati", "Etc/GMT+12"):  # UTC+14 and UTC-12: the day differs across zones
        today = dt.datetime.now(ZoneInfo(tz)).date()
        assert resolve_date("yesterday", tz) in {(today - dt.timedelta(days=1)).isoformat(), today.isoformat()}
        assert resolve_date("today", tz) in {today.isoformat(), (today + dt.timedelta(days=1)).isoformat()}
    assert resolve_date("2026-11-22") == "2026-11-22"
    with pytest.raises(UsageError, match="time zone"):
        resolve_date("yesterday", "Mars/Olympus")
    with pytest.raises(UsageError, match="calendar date"):
        resolve_date("last tuesday")


def test_a_partition_lists_its_shards_once_whatever_it_reads_and_never_ships_them(arch, monkeypatch):
    import pickle

    from pipeline import storage
    listed = []
    real = storage.list_files
    monkeypatch.setattr(storage, "list_files", lambda uri: listed.append(uri) or real(uri))
    night = archive.Partition(arch, "d", "2026-11-22")
    assert night.count_rows() == 5 and len(night.image_ids()) == 5
    assert night.read_table(archive.Rows(products=("washer",)), columns=["image_id"]).num_rows == 1
    assert sorted(night.read_images(["x/0"])) == ["x/0"]
    assert len(listed) == 1  # one listing for the whole walk
    copy = pickle.loads(pickle.dumps(night))  # the filesystem (and its credentials) stays behind
    assert copy == night and "shards" not in copy.__dict__ and copy.count_rows() == 5


def test_the_shard_writer_flushes_by_bytes_into_bounded_row_groups(tmp_path):
    """Large images: a shard is written once its images reach bytes_per_shard (not after 256 rows, ~5 GB of 20 MB
    images), in row groups of about row_group_bytes, so a reader of one row never reads the whole shard."""
    image = bytes(1000)
    w = archive.ShardWriter(str(tmp_path), "d", "2026-11-22", bytes_per_shard=3000, row_group_bytes=1000)
    for k in range(7):
        w.write({"image_id": f"t/{k}", "product": "tile", "split": "test", "image": image,
                 "captured_at": dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc), "label": None, "mask": None,
                 "defect": None, "source_uri": None})
        assert w.pending <= 3
    shards = w.close()
    assert [pq.ParquetFile(u).metadata.num_rows for u in shards] == [3, 3, 1]
    assert all(pq.ParquetFile(u).metadata.row_group(g).num_rows == 1 for u in shards
               for g in range(pq.ParquetFile(u).num_row_groups))
    assert sorted(archive.Partition(str(tmp_path), "d", "2026-11-22").image_ids()) == [f"t/{k}" for k in range(7)]
