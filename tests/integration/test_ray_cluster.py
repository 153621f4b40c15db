"""A real local Ray cluster (`ray start --head` on loopback) running the training job through
`ray job submit`, the way an ML engineer fits a new product line."""
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time

import pytest

from pipeline import registry
from tests.conftest import TINY
from tests.raynodes import RAY, kill_cluster, start_node

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster():
    temp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's socket paths have a length limit
    # A secured cluster, as a plant would run it: token auth with a shared token (Ray >= 2.52).
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    ports = start_node(["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=2"], env,
                       temp, ("port", "dashboard-port", "ray-client-server-port"))
    try:
        yield f"http://127.0.0.1:{ports['dashboard-port']}", env
    finally:
        kill_cluster(temp)


def test_train_job_through_ray_job_submit(cluster, synthetic_src, tmp_path):
    address, env = cluster
    root = tmp_path / "root"
    arch = str(tmp_path / "archive")
    from pipeline.sources.ingest import ingest
    ingest(synthetic_src, arch, "line2", "2026-11-20")
    runtime_env = {"env_vars": {"ANOPLE_ROOT": str(root), "HF_HUB_OFFLINE": "1"}}
    cmd = [RAY, "job", "submit", f"--address={address}", f"--runtime-env-json={json.dumps(runtime_env)}",
           "--", sys.executable, "-m", "jobs.train", "--deployment", "line2", "--archive", arch,
           "--shots", "1", "--backbone", TINY, "--weights", "random", "--prompt-mode", "none"]
    t0 = time.time()
    for _ in range(45):  # the head's job agent takes a few seconds to come up after `ray start`
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=os.getcwd())
        log = out.stdout + out.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(2)
    assert out.returncode == 0, log[-4000:]
    assert "registered anople-line2 version 1 (alias: candidate)" in log, log[-4000:]
    assert "RANDOM-INIT BACKBONE" in log
    assert time.time() - t0 < 600
    os.environ["ANOPLE_ROOT"], old = str(root), os.environ.get("ANOPLE_ROOT")
    try:
        mv = registry.get_version("line2", alias="candidate")
        assert mv.tags["weights_kind"] == "random"
        # K == 1 with extra train normals: the threshold comes from held-out normals, recorded as such
        params = registry.connect().get_run(mv.run_id).data.params
        assert params["threshold_source.tile"] == "heldout_normals" and params["shots"] == "1"
    finally:
        if old is None:
            os.environ.pop("ANOPLE_ROOT")
        else:
            os.environ["ANOPLE_ROOT"] = old
