"""Backbone weights by S3 URI and the train job's refusal of weights it cannot get."""
import io

import boto3
import pytest
import torch

from jobs import train as train_job
from pipeline.fitting.weights import (WeightsUnavailable, check_weights, hub_weights_cached, load_clip, local_weights,
                                      weights_kind)
from pipeline.model.backbone import create_clip, fingerprint
from tests.conftest import TINY


def test_s3_checkpoint_is_fetched_once_and_loaded(bucket, tmp_path):
    src = create_clip(TINY, "random", seed=7)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    boto3.client("s3").put_object(Bucket=bucket, Key="models/tiny.pt", Body=buf.getvalue())
    uri = f"s3://{bucket}/models/tiny.pt"
    assert weights_kind(uri) == "file"
    path = local_weights(uri, cache_dir=str(tmp_path))
    assert path.startswith(str(tmp_path)) and local_weights(uri, cache_dir=str(tmp_path)) == path
    assert fingerprint(load_clip(TINY, uri)) == fingerprint(src)


def test_train_refuses_an_unknown_tag_before_starting_workers(mlflow_root, tmp_path, synthetic_src, capsys):
    from pipeline.sources.ingest import ingest
    arch = str(tmp_path / "a")
    ingest(synthetic_src, arch, "w", "2026-01-01")
    rc = train_job.main(["--deployment", "w", "--archive", arch, "--shots", "1", "--backbone", TINY,
                         "--weights", "laion2b_typo"])
    assert rc == 2
    assert "neither a file nor a pretrained tag" in capsys.readouterr().err


def test_an_offline_tag_missing_from_the_hf_cache_fails_on_the_driver_and_a_cached_one_passes(tmp_path):
    """HF_HUB_OFFLINE (set for the whole suite) and no cached file: deterministic, refused before any Ray
    Train worker (which Ray would retry); the same tag with its file in the cache layout is accepted."""
    cache = tmp_path / "hf"
    with pytest.raises(WeightsUnavailable, match="cannot load weights 'laion400m_e32' for 'ViT-B-16'"):
        check_weights("ViT-B-16", "laion400m_e32", hf_cache=str(cache))
    repo = cache / "models--timm--vit_base_patch16_clip_224.laion400m_e32"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"weights")
    assert hub_weights_cached("ViT-B-16", "laion400m_e32", hf_cache=str(cache)) is True
    check_weights("ViT-B-16", "laion400m_e32", hf_cache=str(cache))
    check_weights(TINY, "random", hf_cache=str(cache))  # neither random nor files consult the hub


@pytest.mark.integration
def test_train_with_an_unfetchable_tag_fails_loudly(ray_local, mlflow_root, tmp_path, synthetic_src, capsys):
    """Offline, a real tag cannot be fetched: the job fails with the reason, it never falls back."""
    from pipeline.sources.ingest import ingest
    arch = str(tmp_path / "a")
    ingest(synthetic_src, arch, "w", "2026-01-01")
    rc = train_job.main(["--deployment", "w", "--archive", arch, "--shots", "1", "--backbone", "ViT-B-16",
                         "--weights", "laion400m_e32"])
    assert rc == 2
    assert "cannot load weights 'laion400m_e32'" in capsys.readouterr().err
