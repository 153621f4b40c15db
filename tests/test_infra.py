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


def _accepts(entrypoint: str) -> None:
    """A RayJob entrypoint runs one of our jobs with arguments that job's own parser accepts."""
    import importlib
    import shlex

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), entrypoint
    job = importlib.import_module(argv[2])
    args = job.parser().parse_args(argv[3:])  # SystemExit (argparse) fails the test
    if hasattr(args, "date"):
        from pipeline.archive import check_date
        check_date(args.date)


def test_kuberay_training_job_runs_the_train_job_with_valid_arguments():
    doc = yaml.safe_load((ROOT / "infra" / "kuberay-train-job.yaml").read_text())
    assert doc["kind"] == "RayJob" and doc["apiVersion"] == "ray.io/v1"
    assert doc["spec"]["entrypoint"].startswith("python -m jobs.train ")
    _accepts(doc["spec"]["entrypoint"])
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for w in workers)


def test_nightly_cronjob_renders_one_valid_scoring_rayjob_per_deployment(tmp_path):
    """Run the CronJob's own script with a stand-in kubectl that keeps what it is given."""
    import os
    import subprocess

    docs = list(yaml.safe_load_all((ROOT / "infra" / "kuberay-nightly-score.yaml").read_text()))
    cron = next(d for d in docs if d["kind"] == "CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f"#!/bin/sh\ncat >> {tmp_path}/applied.yaml\necho ---  >> {tmp_path}/applied.yaml\n")
    kubectl.chmod(0o755)
    subprocess.run(container["command"] + container["args"], check=True, timeout=30,
                   env={**os.environ, **env, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    jobs = [d for d in yaml.safe_load_all((tmp_path / "applied.yaml").read_text()) if d]
    assert [j["kind"] for j in jobs] == ["RayJob"] * len(env["DEPLOYMENTS"].split())
    for j, deployment in zip(jobs, env["DEPLOYMENTS"].split()):
        assert j["metadata"]["name"].startswith(f"anople-score-{deployment}-")
        entry = j["spec"]["entrypoint"]
        assert entry.startswith("python -m jobs.score ") and f"--deployment {deployment} " in entry
        _accepts(entry)
