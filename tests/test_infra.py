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
    """A RayJob entrypoint runs one of our jobs (`python -m jobs.X` or `anople X`) with arguments that job's own
    parser accepts, and a date that resolves."""
    import importlib
    import shlex

    argv = shlex.split(entrypoint)
    if argv[0] == "anople":
        from jobs.anople import VERBS
        module, rest = VERBS[argv[1]][0], argv[2:]
    else:
        assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), entrypoint
        module, rest = argv[2], argv[3:]
    args = importlib.import_module(module).parser().parse_args(rest)  # SystemExit (argparse) fails the test
    if hasattr(args, "date"):
        from pipeline.sources.archive import resolve_date
        resolve_date(args.date, getattr(args, "timezone", "UTC"))


def _version() -> str:
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_kuberay_training_job_runs_the_train_job_with_valid_arguments():
    doc = yaml.safe_load((ROOT / "infra" / "kuberay-train-job.yaml").read_text())
    assert doc["kind"] == "RayJob" and doc["apiVersion"] == "ray.io/v1"
    assert doc["spec"]["entrypoint"].startswith("python -m jobs.train ")
    _accepts(doc["spec"]["entrypoint"])
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for w in workers)


def _nightly_rayjobs():
    """The nightly RayCronJobs' RayJob templates, as the operator would create them."""
    docs = [d for d in yaml.safe_load_all((ROOT / "infra" / "kuberay-nightly-score.yaml").read_text()) if d]
    assert docs and all(d["kind"] == "RayCronJob" and d["apiVersion"] == "ray.io/v1" for d in docs)
    return docs, [d["spec"]["jobTemplate"] for d in docs]


def test_nightly_scoring_is_a_raycronjob_per_deployment_with_a_deadline_and_pinned_images():
    docs, jobs = _nightly_rayjobs()
    deployments = []
    for d, j in zip(docs, jobs):
        fields = d["spec"]["schedule"].split()
        assert len(fields) == 5 and d["spec"]["timeZone"] == "UTC"
        entry = j["entrypoint"]
        assert entry.startswith("anople score ") and "--date yesterday" in entry and "--json" in entry
        _accepts(entry)
        deployments.append(entry.split("--deployment ")[1].split()[0])
        assert d["metadata"]["name"].endswith(deployments[-1])
        assert 0 < j["activeDeadlineSeconds"] < 24 * 3600  # a stuck night ends before the next one starts
        assert j["shutdownAfterJobFinishes"] is True
        images = [c["image"] for c in _containers(j)]
        assert images and all(i.rsplit(":", 1)[-1] == _version() for i in images), images  # never :latest
    assert len(set(deployments)) == len(docs)  # one schedule per deployment
    train = yaml.safe_load((ROOT / "infra" / "kuberay-train-job.yaml").read_text())
    assert all(c["image"].endswith(f":{_version()}") for c in _containers(train))


def _containers(doc):
    """Every container spec in a manifest (any depth)."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "containers":
                yield from v
            else:
                yield from _containers(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _containers(v)


def test_ray_nodes_require_a_provisioned_token_and_the_dashboard_is_not_open(tmp_path):
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    opts = cfg["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in opts and "-e RAY_AUTH_TOKEN" not in opts  # not copied from an unset variable
    env_file = next(o.split()[1] for o in opts if o.startswith("--env-file"))
    assert any(env_file in c and "secretsmanager" in c for c in cfg["initialization_commands"])
    train = yaml.safe_load((ROOT / "infra" / "kuberay-train-job.yaml").read_text())
    for name, docs in (("train", [train]), ("nightly", _nightly_rayjobs()[1])):
        ray = [c for d in docs for c in _containers(d) if "anople" in c["image"]]
        assert ray, name
        for c in ray:
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", (name, c["name"])
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], (name, c["name"])


def test_no_password_on_a_command_line_and_mlflow_behind_authentication():
    import re
    doc = (ROOT / "infra" / "mlflow-server.md").read_text()
    server = doc[doc.index("mlflow server"):].split("```")[0]
    assert "--app-name basic-auth" in server and "--host 127.0.0.1" in server and "0.0.0.0" not in server
    for path in [ROOT / "ray_cluster.yaml", *(ROOT / "infra").glob("*.yaml"), ROOT / "infra" / "mlflow-server.md",
                 ROOT / "README.md"]:
        text = path.read_text()
        assert not re.search(r"\$\{?(PG)?PASSWORD|://[^/\s:@]+:[^/\s@]+@", text), path  # no user:password@ or $PASSWORD
