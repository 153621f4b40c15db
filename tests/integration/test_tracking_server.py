"""The jobs against a team MLflow server the way infra/mlflow-server.md runs it (`mlflow server --app-name
basic-auth`, artifacts served by the server: `mlflow-artifacts:/` URIs), each job its own process with its own
local Ray, as a scheduler runs them: ingest -> train -> promote -> score. Everything else in the suite uses a
sqlite store and local artifact folders."""
import glob
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import pyarrow.dataset as pads
import pytest

from pipeline import storage
from pipeline.nightly import nights
from pipeline.sources.synthetic import make_mvtec_folder
from tests.conftest import SECRET_MARKER, TINY, free_port

pytestmark = pytest.mark.integration
USER, PASSWORD = "admin", SECRET_MARKER + "-mlflow"  # the session's MLflow credential (conftest)


@pytest.fixture(scope="module")
def server(s3_server, tmp_path_factory):
    yield from mlflow_server(tmp_path_factory.mktemp("mlflow-server"))


def mlflow_server(root):
    """An authenticated MLflow server serving its own artifacts, on a free port; yields its url and folder."""
    ini = root / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{root}/basic_auth.db\nadmin_username = {USER}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    # as infra/mlflow-server.md's /etc/mlflow/env: the CSRF key, and the admin's password for the first start
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}
    bindir = os.path.dirname(sys.executable)  # the server execs gunicorn/uvicorn from the venv
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield {"url": url, "root": root}
    proc.terminate()
    proc.wait(30)
    log.close()


def _job(env, *argv):
    out = subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{argv[0]} exit {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def night(server, synthetic_src, tmp_path_factory):
    """ingest -> train -> promote -> score, each a process of its own against the server; their output."""
    tmp = tmp_path_factory.mktemp("server-night")
    arch, out, cache = str(tmp / "archive"), str(tmp / "out"), tmp / "model-cache"
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["url"], "MLFLOW_TRACKING_USERNAME": USER,
           "MLFLOW_TRACKING_PASSWORD": PASSWORD, "ANOPLE_ROOT": str(tmp / "root"), "ANOPLE_MODEL_CACHE": str(cache)}
    for k in ("ANOPLE_ARTIFACT_ROOT", "RAY_ADDRESS"):  # the server's artifact store; each job its own local Ray
        env.pop(k, None)
    started = time.time()
    src = make_mvtec_folder(str(tmp / "night"), ("tile",), n_train=0, n_test_good=3, n_test_defect=1, size=64, seed=9)
    date = "2026-11-24"
    logs = {"ingest": _job(env, "jobs.ingest", synthetic_src, "--archive", arch, "--deployment", "srv", "--date",
                           "2026-11-20")}
    logs["ingest"] += _job(env, "jobs.ingest", f"{src}/tile/test", "--archive", arch, "--deployment", "srv",
                           "--date", date, "--product", "tile")
    logs["train"] = _job(env, "jobs.train", "--deployment", "srv", "--archive", arch, "--shots", "1", "--backbone",
                         TINY, "--weights", "random", "--epochs", "2", "--steps-per-epoch", "1")
    logs["promote"] = _job(env, "jobs.promote", "--deployment", "srv", "--from-alias", "candidate", "--to",
                           "production", "--force")
    logs["score"] = _job(env, "jobs.score", "--deployment", "srv", "--archive", arch, "--date", date, "--output", out)
    return {"tmp": tmp, "out": out, "cache": cache, "date": date, "logs": logs, "started": started}


def test_a_night_scored_against_an_authenticated_tracking_server(server, night):
    # the registered version lives on the server: its source is the server's artifact URI
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=server["url"])
    os.environ["MLFLOW_TRACKING_USERNAME"] = USER  # this process's client authenticates as the jobs did
    try:
        mv = client.get_model_version_by_alias("anople-srv", "production")
        assert mv.source.startswith("mlflow-artifacts:/"), mv.source
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
    # every row of the night, scored, from a model fetched once into this node's cache (whole, no partial left)
    fs, path = storage.arrow_filesystem(nights.Night(night["out"], "srv", night["date"]).uri)
    rows = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_id", "status"]).to_pylist()
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows), rows  # 3 good + 1 of each defect type
    cached = sorted(os.listdir(night["cache"]))
    assert len(cached) == 1 and not cached[0].startswith("."), cached
    # the credential reached the server, and nothing the jobs wrote or printed, nor their Ray sessions' logs
    assert all(PASSWORD not in text for text in night["logs"].values())
    sessions = [d for d in glob.glob(os.path.join(tempfile.gettempdir(), "ray", "session_2*"))
                if os.path.getmtime(d) >= night["started"]]
    assert sessions  # the jobs' own local Ray instances
    seen = 0
    for place in [str(night["tmp"]), *sessions]:
        for folder, _, files in os.walk(place):
            for name in files:
                try:
                    with open(os.path.join(folder, name), "rb") as f:
                        assert PASSWORD.encode() not in f.read(), os.path.join(folder, name)
                    seen += 1
                except OSError:
                    continue  # a socket, a file Ray removed meanwhile
    assert seen > 50


def test_a_training_job_prints_its_epochs_not_the_libraries_info_lines(night):
    """What an ML engineer reads from `python -m jobs.train`: the epoch lines, not Ray Train's per-report and
    worker-group INFO lines or faiss's and open_clip's loading steps (Ray Train sets its workers' root logger
    to INFO after the worker's setup hook ran)."""
    out = night["logs"]["train"]
    assert "train: epoch 1/2" in out and "train: epoch 2/2" in out
    for chatter in ("Reporting training result", "Started training worker group", "Setting up process group",
                    "Loading faiss", "Parsing model identifier", "Instantiating model architecture",
                    "Checkpoint successfully created"):
        assert chatter not in out, chatter
