"""The plant's jobs against a flaky object store: a seeded fault-injecting proxy in front of the moto S3
server (503 SlowDown, 500, connection resets, slow answers). Every job completes, no row is lost or
duplicated, and no fault becomes an error row."""
import json
import os
import subprocess
import sys

import boto3
import pyarrow.dataset as pads
import pytest

from pipeline import storage
from pipeline.nightly import nights
from pipeline.sources import archive
from pipeline.sources.synthetic import make_mvtec_folder
from tests.conftest import TINY
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.integration


def _upload(local, bucket, prefix):
    s3 = boto3.client("s3")
    for root, _, files in os.walk(local):
        for f in files:
            s3.upload_file(os.path.join(root, f), bucket, f"{prefix}/{os.path.relpath(os.path.join(root, f), local)}")


def test_every_job_completes_through_storage_faults(bucket, s3_server, tmp_path):
    src = make_mvtec_folder(str(tmp_path / "src"), ("tile", "washer"), n_train=4, n_test_good=3, n_test_defect=1,
                            size=64, seed=0)  # 20 rows
    _upload(src, bucket, "faults/src")
    arch, out = f"s3://{bucket}/faults/archive", f"s3://{bucket}/faults/out"
    night = [["jobs.ingest", f"s3://{bucket}/faults/src", "--archive", arch, "--deployment", "flaky",
              "--date", "2026-11-20"],
             ["jobs.train", "--deployment", "flaky", "--archive", arch, "--shots", "1", "--backbone", TINY,
              "--weights", "random", "--prompt-mode", "none"],
             ["jobs.evaluate", "--deployment", "flaky", "--archive", arch],
             ["jobs.promote", "--deployment", "flaky", "--from-alias", "candidate", "--to", "production", "--force"],
             ["jobs.score", "--deployment", "flaky", "--archive", arch, "--date", "2026-11-20", "--output", out,
              "--max-error-rate", "0"]]
    # one process for the five jobs (one local Ray, started with the proxy as its S3 endpoint), each through
    # its own main(argv): what `python -m jobs.<name> ...` runs
    script = ("import importlib, json, sys\n"
              f"for argv in json.loads({json.dumps(json.dumps(night))}):\n"
              "    rc = importlib.import_module(argv[0]).main(argv[1:])\n"
              "    if rc: sys.exit(f'{argv[0]} exited {rc}')\n")
    with FaultProxy(s3_server, seed=7) as proxy:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(AWS_ENDPOINT_URL=proxy.url, ANOPLE_ROOT=str(tmp_path / "root"))
        env.pop("MLFLOW_TRACKING_URI", None)
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
        counts = dict(proxy.counts)
    assert counts["slowdown"] + counts["error"] + counts["reset"] >= 10, counts  # the faults were real
    ids = archive.read_table(arch, "flaky", "2026-11-20", columns=["image_id"])["image_id"].to_pylist()
    fs, path = storage.arrow_filesystem(nights.Night(out, "flaky", "2026-11-20").uri)
    rows = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_id", "status"]).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(ids) and len(ids) == 20  # 0 lost, 0 duplicated
    assert all(r["status"] == "ok" for r in rows)  # no fault became an error row
    print("faults injected:", counts)
