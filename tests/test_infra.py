"""Cluster and job configs are checked offline: Ray's own validator, and YAML that parses."""
import copy
import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ray_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert cfg["docker"]["image"]


def test_validator_really_rejects_a_broken_config():
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    cfg["available_node_types"]["worker.gpu"]["no_such_key"] = 1
    with pytest.raises(Exception):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("name", ["kuberay-train-job.yaml", "kuberay-nightly-score.yaml"])
def test_kuberay_manifests_parse_and_run_our_jobs(name):
    docs = list(yaml.safe_load_all((ROOT / "infra" / name).read_text()))
    text = (ROOT / "infra" / name).read_text()
    assert docs and all(d["apiVersion"] for d in docs)
    assert "python -m jobs." in text
