"""jobs.train the way a user reruns it: two data-parallel Ray Train workers, a rerun that resumes from the
epoch checkpoints instead of training again, and --restart that trains from scratch."""
import json
import os

import pytest
import torch
from safetensors.torch import load as st_load

from jobs import ingest as ingest_job
from jobs import train as train_job
from pipeline import artifact, registry, storage
from pipeline.model.config import IMAGE_SCORES
from tests.conftest import TINY

pytestmark = pytest.mark.integration


def _prompts(version):
    mv = registry.get_version("line2", version=version)
    uri = registry.artifact_uri(mv)
    return st_load(storage.read_bytes(storage.join(uri, "prompts.safetensors")))


def test_two_workers_then_resume_then_restart(ray_local, synthetic_src, mlflow_root, tmp_path, capsys):
    arch = str(tmp_path / "archive")
    assert ingest_job.main([synthetic_src, "--archive", arch, "--deployment", "line2", "--date", "2026-11-20"]) == 0
    args = ["--deployment", "line2", "--archive", arch, "--shots", "1", "--backbone", TINY, "--weights", "random",
            "--epochs", "2", "--steps-per-epoch", "2", "--num-workers", "2", "--class-name", 'tile="ceramic tile"']
    capsys.readouterr()
    for bad in (["--class-name", "tile"], ["--class-name", 'tile=""'], ["--class-name", "=words"]):
        with pytest.raises(SystemExit) as e:  # a usage error before any cluster work
            train_job.main(args + bad)
        assert e.value.code == 2
    assert train_job.main(args[:-2] + ["--class-name", "tyle=ceramic tile"]) == 2  # a product the archive lacks
    assert "class names given for ['tyle']" in capsys.readouterr().err

    assert train_job.main(args) == 0
    first = capsys.readouterr().out
    assert "2 epoch(s) this run" in first
    # the products' words: the user's for tile, the name for the others; stored in the artifact and MLflow
    assert 'tile ("ceramic tile"): threshold' in first and 'washer ("washer"): threshold' in first
    mv1 = registry.get_version("line2", version=1)
    spec = artifact.load_spec(registry.artifact_uri(mv1))
    assert {p: ps.class_name for p, ps in spec.products.items()} == {
        "fabric": "fabric", "tile": "ceramic tile", "washer": "washer"}
    assert spec.anople["class_names"]["tile"] == "ceramic tile"
    params = registry.connect().get_run(mv1.run_id).data.params
    assert params["class_name.tile"] == "ceramic tile"
    # the image score the validation chose (no test data) is the artifact's, recorded in MLflow
    assert spec.anople["image_score"] in IMAGE_SCORES and params["resolved.image_score"] == spec.anople["image_score"]
    assert f"image score {spec.anople['image_score']}" in first
    assert "products: fabric, tile, washer" in first  # worker 0 fitted two products, worker 1 one
    ckpts = [u.rsplit("/", 1)[-1] for u in storage.list_files(str(mlflow_root / "ray_results"))
             if "prompt-checkpoints" in u]
    assert sorted(ckpts) == ["epoch-0001.pt", "epoch-0002.pt"]
    files = storage.list_files(registry.artifact_uri(registry.get_version("line2", version=1)))
    assert sorted(u.rsplit("/", 1)[-1] for u in files if "worker-" in u) == ["worker-0.json", "worker-1.json"]

    assert train_job.main(args) == 0  # same data, shots, seed, config: resumes at epoch 2 of 2
    second = capsys.readouterr().out
    assert "epoch(s) this run" not in second and "version 2" in second
    a, b = _prompts(1), _prompts(2)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # the checkpoint's prompts, exactly

    # each of the 2 workers reserved 1 of the 2 CPUs, and torch ran on it
    assert "fit: 2 Ray Train worker(s), 1 CPU(s) each" in first
    workers = [json.loads(storage.read_bytes(storage.join(registry.artifact_uri(mv1), f"worker-{r}.json"))) for r in (0, 1)]
    assert [w["torch_threads"] for w in workers] == [1, 1]

    # the run key leaves out the worker count: one worker restarts the same run, on both CPUs (issue 24, item 7:
    # it was Ray's one CPU and one torch thread)
    assert train_job.main(args[:args.index("--num-workers")] + args[args.index("--num-workers") + 2:]
                          + ["--restart"]) == 0
    third = capsys.readouterr().out
    assert "2 epoch(s) this run" in third and "fit: 1 Ray Train worker(s), 2 CPU(s) each" in third
    uri3 = registry.artifact_uri(registry.get_version("line2", version=3))
    assert json.loads(storage.read_bytes(storage.join(uri3, "worker-0.json")))["torch_threads"] == 2
    # the three runs share one deterministic Ray Train run folder, named by the run key
    key = registry.connect().get_run(registry.get_version("line2", version=3).run_id).data.params["run_key"]
    assert os.listdir(mlflow_root / "ray_results") == [key]


def test_a_killed_training_worker_resumes_from_its_last_epoch(ray_local, synthetic_src, mlflow_root, tmp_path):
    """A preempted node, once: the worker group restarts, resumes at the last epoch checkpoint and ends
    with the prompts of an uninterrupted run."""
    import dataclasses

    from pipeline.fitting.config import TrainConfig
    from pipeline.fitting.job import WorkerCrash
    from pipeline.fitting.ray_train import fit_deployment, with_class_names
    from pipeline.model.config import AnoPLeConfig
    from pipeline.sources.ingest import ingest

    arch = str(tmp_path / "archive")
    ingest(synthetic_src, arch, "kill", "2026-11-20")
    cfg = TrainConfig(deployment="kill", archive=arch, shots=1, backbone=TINY, weights="random",
                      anople=AnoPLeConfig(epochs=3, steps_per_epoch=2, batch_shots=2), storage_path=str(tmp_path / "straight"))
    fit_deployment(cfg, str(tmp_path / "out-straight"))
    killed = dataclasses.replace(cfg, storage_path=str(tmp_path / "killed"))
    _, summary = fit_deployment(killed, str(tmp_path / "out-killed"), fault=WorkerCrash(after_epoch=1))
    # the fit's run key includes the resolved class names, so the marker sits under that key's checkpoints
    assert storage.exists(storage.join(with_class_names(killed).checkpoints(), "_injected-crash"))  # it did die, once
    assert [e["epoch"] for e in summary["epochs"]] == [2, 3]  # the restarted group trained only the rest
    a = st_load(open(tmp_path / "out-straight" / "prompts.safetensors", "rb").read())
    b = st_load(open(tmp_path / "out-killed" / "prompts.safetensors", "rb").read())
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
