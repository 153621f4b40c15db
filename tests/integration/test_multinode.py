"""The pipeline on a Ray cluster of three nodes on this machine (a head and two worker nodes, each `ray start` with
its own temp folder and its own model cache, as separate machines would be), jobs submitted the way users do
(`anople submit`, Ray's job server), the model behind an MLflow tracking server so that each node fetches it
itself. Issue 24: scoring actors and training workers on the worker nodes only; a worker node killed mid-night
(the one holding the only scoring actor) and the night still whole; a scheduler's second submission attaching
to the running job instead of starting another."""
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time

import pyarrow.dataset as pads
import pytest

from pipeline import storage
from pipeline.nightly import nights
from pipeline.sources.synthetic import make_mvtec_folder
from tests.conftest import TINY
from tests.integration.test_tracking_server import PASSWORD, USER, mlflow_server
from tests.raynodes import kill_cluster, processes, start_node

pytestmark = pytest.mark.integration
DATE = "2026-11-25"
N_NIGHT = 96


@pytest.fixture(scope="module")
def server(s3_server, tmp_path_factory):
    yield from mlflow_server(tmp_path_factory.mktemp("mlflow-server"))


@pytest.fixture(scope="module")
def cluster(server, tmp_path_factory):
    """head: 1 CPU, the job server, no worker resource; nodes a and b: 2 CPUs and `anople_worker` each."""
    root = tmp_path_factory.mktemp("multinode")
    base = tempfile.mkdtemp(prefix="raym", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "HF_HUB_OFFLINE": "1",
           # what each node's own environment holds on a real cluster (a Secret, an instance role): the tracking
           # server and its credential; never the job's runtime env
           "MLFLOW_TRACKING_URI": server["url"], "MLFLOW_TRACKING_USERNAME": USER,
           "MLFLOW_TRACKING_PASSWORD": PASSWORD, "ANOPLE_ROOT": str(root / "root")}
    for k in ("RAY_ADDRESS", "ANOPLE_ARTIFACT_ROOT", "ANOPLE_MODEL_CACHE"):
        env.pop(k, None)
    temps = {n: os.path.join(base, n) for n in ("head", "a", "b")}
    caches = {n: str(root / f"cache-{n}") for n in ("head", "a", "b")}
    try:
        ports = start_node(["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=1"],
                           env | {"ANOPLE_MODEL_CACHE": caches["head"]}, temps["head"],
                           ("port", "dashboard-port", "ray-client-server-port"))
        port, dash = ports["port"], ports["dashboard-port"]
        for n in ("a", "b"):
            start_node([f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"anople_worker": 1}'],
                       env | {"ANOPLE_MODEL_CACHE": caches[n]}, temps[n])
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "temps": temps, "caches": caches, "root": root,
               "port": port, "base": base}
    finally:
        kill_cluster(base)


def _submit(cluster, *argv, wait=True):
    """anople submit as its own process (the scheduler's call); its exit code and output."""
    runtime_env = {"env_vars": {"ANOPLE_WORKER_RESOURCE": "anople_worker", "ANOPLE_STAGE_ROWS": "4"}}
    cmd = [sys.executable, "-m", "jobs.submit", "--address", cluster["address"], "--python", sys.executable,
           "--runtime-env-json", json.dumps(runtime_env), *([] if wait else ["--no-wait"]), "--", *argv]
    for _ in range(45):  # the head's job agent takes a few seconds to come up after `ray start`
        out = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=900, cwd=os.getcwd())
        log = out.stdout + out.stderr
        if "No available agent to submit job" not in log:
            return out.returncode, log
        time.sleep(2)
    raise AssertionError(log[-3000:])


def _heatmaps(night) -> int:
    """Heatmaps the night's runs have written so far: the scoring actors' progress."""
    try:
        return len(storage.list_files(night.heatmap_root))
    except FileNotFoundError:
        return 0


def _fetched(cache):
    """Model versions this node fetched into its own cache."""
    return [d for d in os.listdir(cache) if not d.startswith(".")] if os.path.isdir(cache) else []


def test_a_night_survives_losing_the_node_of_its_only_scoring_actor(cluster, synthetic_src, tmp_path):
    arch, out = str(tmp_path / "archive"), str(tmp_path / "out")
    from pipeline.sources.ingest import ingest
    ingest(synthetic_src, arch, "mn", "2026-11-20")
    night = make_mvtec_folder(str(tmp_path / "night"), ("tile", "washer"), n_train=0, n_test_good=45,
                              n_test_defect=1, size=64, seed=11)
    for p in ("tile", "washer"):
        ingest(f"{night}/{p}/test", arch, "mn", DATE, product=p)

    # item 1: the training workers run on the worker nodes (the head has no anople_worker)
    rc, log = _submit(cluster, "train", "--deployment", "mn", "--archive", arch, "--shots", "1", "--backbone",
                      TINY, "--weights", "random", "--epochs", "1", "--steps-per-epoch", "1")
    assert rc == 0 and "registered anople-mn version 1" in log, log[-4000:]
    assert "fit: 1 Ray Train worker(s), 2 CPU(s) each" in log  # a worker node's 2 cores, not the head's 1
    rc, log = _submit(cluster, "promote", "--deployment", "mn", "--from-alias", "candidate", "--to", "production",
                      "--force")
    assert rc == 0, log[-3000:]

    score = ["score", "--deployment", "mn", "--archive", arch, "--date", DATE, "--output", out,
             "--actors-per-shard", "1", "--batch-size", "2"]
    rc, log = _submit(cluster, *score, wait=False)
    assert rc == 0 and "submitted job anople-score-mn-" + DATE in log, log[-3000:]
    # item 5: the scheduler's retry while it runs attaches to it, it does not start a second night
    rc, log = _submit(cluster, *score, wait=False)
    assert rc == 0 and "attached job anople-score-mn-" + DATE in log, log[-3000:]

    n = nights.Night(out, "mn", DATE)
    # The kill lands while the actor is scoring: after its first heatmaps are written (on its node), long before
    # the last. (Waiting for a committed staging part instead lost the race on a quiet machine: the driver
    # commits behind the actor, which had scored all 48 rows of the smaller night before the first poll saw a
    # part, and the kill landed after the publish.)
    deadline, victim = time.time() + 400, None
    while time.time() < deadline and victim is None:
        holders = [x for x in ("a", "b") if _fetched(cluster["caches"][x])]
        if holders and _heatmaps(n) >= 2:
            victim = holders[0]
        else:
            time.sleep(0.05)
    assert victim, "the night never started scoring"
    # (the head's cache holds the driver's own copy: it checks the files' hashes before any actor starts; the
    # head has no anople_worker, so no actor can run there)
    assert _fetched(cluster["caches"]["head"])
    kill_cluster(cluster["temps"][victim])  # the node's raylet, its workers, everything on it
    t_kill, at_kill = time.time(), _heatmaps(n)
    assert at_kill < N_NIGHT // 2 and not n.published(), f"the kill came late: {at_kill} of {N_NIGHT} rows scored"

    rc, log = _submit(cluster, *score)  # attaches again and follows the job to its end
    assert rc == 0 and "SUCCEEDED" in log, log[-5000:]
    fs, path = storage.arrow_filesystem(n.uri)
    rows = pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["image_id", "status", "heatmap_uri"]).to_pylist()
    ids = [r["image_id"] for r in rows]
    assert len(ids) == N_NIGHT and len(set(ids)) == N_NIGHT  # 0 lost, 0 twice
    assert all(r["status"] == "ok" and storage.exists(r["heatmap_uri"]) for r in rows)
    other = "b" if victim == "a" else "a"
    marker = n.published()
    # the restarted actor fetched the model on the node left
    assert _fetched(cluster["caches"][other]), (marker, log[-4000:])
    assert marker["nodes_lost"] and marker["rows"] == N_NIGHT, marker
    print(f"multinode: node {victim} killed after {at_kill} of {N_NIGHT} heatmaps; night finished "
          f"{time.time() - t_kill:.1f} s later; "
          f"marker {json.dumps({k: marker[k] for k in ('rows', 'nodes_lost', 'rows_rerun_after_node_loss')})}")


def _node_of(cluster, title: str) -> str | None:
    """The worker node (a, b or c) whose raylet started the process whose title starts with `title`."""
    procs = processes()
    for pid, (ppid, cmd) in procs.items():
        if not cmd.startswith(title):
            continue
        while ppid in procs:
            for n, temp in cluster["temps"].items():
                if n != "head" and temp in procs[ppid][1]:
                    return n
            ppid = procs[ppid][0]
    return None


def _prompts(cluster, version: int) -> dict:
    import mlflow
    from safetensors.torch import load as st_load
    client = mlflow.MlflowClient(tracking_uri=cluster["env"]["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version("anople-fit", str(version))
    from pipeline.registry import model_source  # the pipeline's folder inside the pyfunc model
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_source(mv)}/prompts.safetensors",
                                                tracking_uri=cluster["env"]["MLFLOW_TRACKING_URI"])
    with open(local, "rb") as f:
        return st_load(f.read())


def _join(cluster, name: str) -> None:
    """A worker node joins, as an autoscaler's replacement would: 2 CPUs, `anople_worker`, its own model cache."""
    cluster["temps"][name] = os.path.join(cluster["base"], name)
    start_node([f"--address=127.0.0.1:{cluster['port']}", "--num-cpus=2", '--resources={"anople_worker": 1}'],
               cluster["env"] | {"ANOPLE_MODEL_CACHE": str(cluster["root"] / f"cache-{name}")}, cluster["temps"][name])


def test_a_two_node_fit_survives_losing_a_workers_node_with_one_workers_prompts(cluster, synthetic_src, tmp_path,
                                                                                  monkeypatch):
    """Items 3 and 6: a fit with --num-workers 2, one worker on each worker node (one `anople_worker` each), loses
    the node of one of them after its first epoch checkpoint; Ray Train brings the group back when a node returns
    and the fit resumes from that checkpoint. Its prompts are those of an uninterrupted fit on ONE worker."""
    from pipeline.model.config import AnoPLeConfig
    _join(cluster, "c")  # the night's test above lost a node: two worker nodes again
    arch = str(tmp_path / "archive")
    from pipeline.sources.ingest import ingest
    ingest(synthetic_src, arch, "fit", "2026-11-20")
    fit = ["train", "--deployment", "fit", "--archive", arch, "--shots", "1", "--backbone", TINY, "--weights", "random",
           "--epochs", "4", "--steps-per-epoch", "3"]
    killed = fit + ["--num-workers", "2", "--storage-path", str(tmp_path / "killed")]
    rc, log = _submit(cluster, *killed, wait=False)
    assert rc == 0, log[-3000:]
    deadline, victim = time.time() + 400, None
    while time.time() < deadline and victim is None:
        if any(p.name == "epoch-0001.pt" for p in (tmp_path / "killed").rglob("epoch-*.pt")):
            victim = _node_of(cluster, "ray::RayTrainWorker")
        time.sleep(0.2)
    assert victim, "the fit ended (or its workers were not found) before a node could be lost"
    kill_cluster(cluster["temps"][victim])
    _join(cluster, "d")  # the node returns (a replacement): the group of two fits again
    rc, log = _submit(cluster, *killed)  # attaches and follows the fit to its end
    assert rc == 0 and "SUCCEEDED" in log, log[-5000:]
    assert "2 Ray Train worker(s)" in log and "registered anople-fit version 1" in log, log[-5000:]
    assert "4 epoch(s) this run" not in log, log[-5000:]  # resumed from its checkpoint, not redone
    rc, log = _submit(cluster, *fit, "--num-workers", "1", "--storage-path", str(tmp_path / "straight"))
    assert rc == 0 and "registered anople-fit version 2" in log, log[-3000:]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    two, one = _prompts(cluster, 1), _prompts(cluster, 2)
    assert two.keys() == one.keys()
    for k in one:  # float tolerance under Adam (tests/test_prompt_training.py says why these bounds)
        assert float((two[k] - one[k]).norm()) <= 1e-3 * float(one[k].norm()) + 1e-6, k
        assert float((two[k] - one[k]).abs().max()) <= 4 * 3 * AnoPLeConfig().lr, k
