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


def test_credentials_in_a_storage_uri_are_refused_and_never_echoed(tmp_path, capsys):
    """s3://KEY:SECRET@bucket/... would be written verbatim into params, markers, heatmap_uri and errors: refused
    (exit 2) by every job before any I/O, the secret masked in the message."""
    from jobs import ingest as ingest_job
    from jobs import score as score_job
    from pipeline import storage

    secret = "s3://AKIAEXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCY@bucket/prefix"
    assert storage.redact(secret) == "s3://***@bucket/prefix"
    assert storage.redact("http://user:pw@mlflow.plant:5000") == "http://***@mlflow.plant:5000"
    assert storage.redact("s3://bucket/a@b") == "s3://bucket/a@b"  # an '@' in a key is not credentials
    assert ingest_job.main([secret, "--archive", str(tmp_path / "a"), "--deployment", "d", "--date",
                            "2026-11-20"]) == 2
    assert score_job.main(["--deployment", "d", "--archive", str(tmp_path / "a"), "--date", "2026-11-20",
                           "--output", secret]) == 2
    captured = capsys.readouterr()
    assert "credentials in a storage URI are refused" in captured.err
    assert "wJalrX" not in captured.err + captured.out and "AKIAEXAMPLE" not in captured.err + captured.out


def test_caches_are_private_to_their_user(tmp_path):
    import os
    import stat

    import pytest

    from pipeline import storage
    from pipeline.errors import UsageError

    made = storage.private_dir(str(tmp_path / "cache"))
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # a folder another user could have planted a model in
    with pytest.raises(UsageError, match="writable by others"):
        storage.private_dir(str(shared))
    assert storage.user_temp("anople-models").endswith(f"anople-models-{os.getuid()}")
