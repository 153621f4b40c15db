"""Shared fixtures. Nothing is downloaded: a hub tag fails fast (HF_HUB_OFFLINE) and all images are the
project's own synthetic products. S3 is a real S3 API: moto in server mode on 127.0.0.1."""
from __future__ import annotations

import os
import random
import socket

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest  # noqa: E402

TINY = "anople-tiny-vit"
# The S3 secret of the whole session: distinctive, so a test can grep every log and store for it.
SECRET_MARKER = "anople-marker-secret-" + os.urandom(6).hex()  # 4-block, 64 px random-init open_clip config shipped in pipeline/model/configs


# Servers the tests start listen on ports from 20000-32767: above Ray's worker port range (10002-19999) and
# below the kernel's ephemeral range (32768-60999 by default), where every outgoing connection of the suite's
# other processes takes its source port; a port picked there (bind to 0) can be taken again before the
# server binds it, which once failed a `ray start` in CI.
PORT_RANGE = (20000, 32767)


def free_port() -> int:
    """A loopback port outside Ray's worker range and the ephemeral range, free when picked."""
    for _ in range(200):
        port = random.randint(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")


@pytest.fixture(scope="session", autouse=True)
def s3_server():
    """A moto S3 server on loopback; the standard AWS variables point every client at it. Autouse, so
    the variables are set before any test starts Ray (local workers copy the environment at start)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": SECRET_MARKER, "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1",
                       # read by nothing here (sqlite store): a second credential that must not leak either
                       "MLFLOW_TRACKING_PASSWORD": SECRET_MARKER + "-mlflow"})
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def bucket(s3_server):
    import boto3
    name = "anople-test"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One in-process Ray for the session, started after the S3 variables are set (workers inherit them)."""
    import ray

    from pipeline.cluster import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_src(tmp_path_factory):
    from pipeline.sources.synthetic import make_mvtec_folder
    return make_mvtec_folder(str(tmp_path_factory.mktemp("src")), products=("tile", "washer", "fabric"),
                             n_train=4, n_test_good=3, n_test_defect=1, size=64, seed=0)


@pytest.fixture
def mlflow_root(tmp_path, monkeypatch):
    """A private MLflow store (sqlite) and local root for one test."""
    monkeypatch.setenv("ANOPLE_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ANOPLE_ARTIFACT_ROOT", raising=False)
    monkeypatch.setenv("ANOPLE_MODEL_CACHE", str(tmp_path / "model-cache"))  # fetched versions, never in /tmp
    return tmp_path / "root"


@pytest.fixture(scope="session")
def tiny_clip():
    """The 4-block, 64 px random-init backbone (seed 0), frozen; shared, never modified by AnoPLe."""
    from pipeline.model.backbone import create_clip
    return create_clip(TINY, "random", seed=0)


@pytest.fixture
def tiny_model(tiny_clip):
    """tiny_model(**AnoPLeConfig knobs) -> an AnoPLe on the tiny backbone, in eval mode."""
    from pipeline.model.anople import AnoPLe, build_tokenizer
    from pipeline.model.config import AnoPLeConfig

    def make(**knobs) -> AnoPLe:
        return AnoPLe(tiny_clip, AnoPLeConfig(**knobs), build_tokenizer(TINY)).eval()
    return make
