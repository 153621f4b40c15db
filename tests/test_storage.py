import pytest

from pipeline import storage


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    if request.param == "file":
        return "file://" + str(tmp_path)
    request.getfixturevalue("bucket")
    return f"s3://anople-test/storage-{id(tmp_path)}"


def test_write_read_list_remove(root):
    a = storage.join(root, "x", "a.bin")
    b = storage.join(root, "x", "sub", "b.bin")
    storage.write_bytes(a, b"hello")
    storage.write_bytes(b, b"world")
    assert storage.read_bytes(a) == b"hello"
    assert storage.exists(b)
    listed = storage.list_files(storage.join(root, "x"))
    assert [u.rsplit("/", 1)[1] for u in listed] == ["a.bin", "b.bin"]
    assert storage.read_bytes(listed[1]) == b"world"  # listed URIs are readable as they are
    storage.remove_tree(storage.join(root, "x"))
    assert not storage.exists(a)
    with pytest.raises(FileNotFoundError):
        storage.list_files(storage.join(root, "x"))


def test_arrow_filesystem_follows_the_endpoint(bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq
    fs, path = storage.arrow_filesystem(f"s3://{bucket}/arrow/t.parquet")
    pq.write_table(pa.table({"a": [1, 2]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs)["a"].to_pylist() == [1, 2]


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported storage scheme"):
        storage.normalize("gs://bucket/x")
