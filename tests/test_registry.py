import os
import shutil
import time

import pytest

from jobs import promote as promote_job
from pipeline import registry, serving


def _register(deployment, weights_kind, tmp_path):
    mlflow = registry.connect()
    art = tmp_path / f"art-{weights_kind}"
    art.mkdir()
    (art / "model.json").write_text("{}")
    with mlflow.start_run(experiment_id=registry.experiment_id(deployment)) as run:
        logged = serving.log_model(str(art))
    return registry.register(deployment, run.info.run_id, logged.model_id, {"weights_kind": weights_kind})


def test_register_sets_candidate_and_promotion_is_gated(mlflow_root, tmp_path, capsys):
    v1 = _register("line9", "hub", tmp_path)
    v2 = _register("line9", "random", tmp_path)
    # a version nobody evaluated is refused, whatever its weights
    assert promote_job.main(["--deployment", "line9", "--version", "1", "--to", "production"]) == 3
    assert "no completed evaluation" in capsys.readouterr().err
    for mv, auroc in ((v1, 0.9), (v2, 0.7)):
        registry.record_evaluation(mv, {"image_auroc": auroc, "pixel_auroc": 0.8, "aupro": 0.6}, 0)
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    assert str(registry.get_version("line9", alias="candidate").version) == "2"
    assert str(mlflow_root) in registry.tracking_uri()
    # the random-weights candidate is refused...
    rc = promote_job.main(["--deployment", "line9", "--from-alias", "candidate", "--to", "production"])
    assert rc == 3 and "random-init" in capsys.readouterr().err
    with pytest.raises(LookupError):
        registry.get_version("line9", alias="production")
    # ...an evaluated real-weights version by number is not, and --force overrides the gate
    assert promote_job.main(["--deployment", "line9", "--version", "1", "--to", "production"]) == 0
    assert str(registry.get_version("line9", alias="production").version) == "1"
    assert promote_job.main(["--deployment", "line9", "--version", "2", "--to", "production", "--force"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM-INIT" in out
    table = {line.split(" (")[0]: line for line in out.splitlines() if line.startswith("version ")}
    assert "90.0" in table["version 1"] and "70.0" in table["version 2"]  # the candidate beside production
    mv = registry.get_version("line9", alias="production")
    assert str(mv.version) == "2" and set(mv.aliases) == {"candidate", "production"}
    assert registry.artifact_uri(mv).endswith("/anople")


def test_missing_model_is_a_clear_error(mlflow_root, capsys):
    assert promote_job.main(["--deployment", "nothere", "--version", "1", "--to", "production"]) == 2
    assert "anople-nothere" in capsys.readouterr().err


def test_a_model_behind_the_tracking_server_is_fetched_by_each_process_not_handed_over_as_a_local_path(
        mlflow_root, tmp_path):
    """Actors get the registry's URI and fetch it on their own node; a runs:/ URI stands for any
    tracking-server URI (mlflow-artifacts:/ behind `mlflow server` works the same way)."""
    mv = _register("line7", "hub", tmp_path)
    source = registry.client().get_model_version(mv.name, mv.version).source.replace("file://", "")
    assert registry.model_source(mv) == source + "/artifacts/anople"  # the pipeline's part of the MLflow model
    served = type("MV", (), {"source": "mlflow-artifacts:/1/models/m-1/artifacts", "tags": mv.tags})()
    assert registry.model_source(served) == "mlflow-artifacts:/1/models/m-1/artifacts/artifacts/anople"  # handed on
    remote = f"models:/{mv.name}/{mv.version}"
    local = registry.materialize(remote)
    assert local != remote and (tmp_path / "art-hub" / "model.json").read_text() == open(
        f"{local}/artifacts/anople/model.json").read()
    assert registry.materialize(remote) == local  # once per process
    assert registry.materialize("s3://bucket/x") == "s3://bucket/x"


def test_fetched_versions_are_cached_once_per_node_and_the_cache_stays_bounded(mlflow_root, tmp_path, monkeypatch):
    """Every scoring actor of every night fetches its model: before, each fetch left its own copy in the temp
    folder for good (a node filled its disk night after night). Now a node keeps one copy per version, shared
    by its processes; versions unused for a week go; a fetch that dies leaves no version folder behind."""
    mv = _register("line8", "hub", tmp_path)
    cache = tmp_path / "model-cache"
    pinned = f"models:/{mv.name}/{mv.version}"
    first = registry.materialize(pinned)
    monkeypatch.setattr(registry, "_FETCHED", {})  # as a new process (another actor, the next night) sees it
    assert registry.materialize(pinned) == first and first.startswith(str(cache))
    (entry,) = cache.iterdir()  # one copy, no partial download left
    assert first.startswith(str(entry))
    assert open(f"{first}/artifacts/anople/model.json").read() == (tmp_path / "art-hub" / "model.json").read_text()

    stale = cache / "0123456789abcdef01234567"
    stale.mkdir()
    os.utime(stale, (time.time() - 8 * 86400,) * 2)
    monkeypatch.setattr(registry, "_FETCHED", {})
    registry.materialize(pinned)
    assert not stale.exists() and os.path.isdir(first)  # the one in use is kept

    # a moving reference is never cached: tomorrow's alias may name another version
    moving = registry.materialize(f"models:/{mv.name}@candidate")
    assert not moving.startswith(str(cache)) and os.path.isfile(f"{moving}/artifacts/anople/model.json")

    def dies(artifact_uri, dst_path):
        open(os.path.join(dst_path, "half"), "w").close()
        raise OSError("connection reset")
    monkeypatch.setattr(registry, "_FETCHED", {})
    monkeypatch.setattr(registry.connect().artifacts, "download_artifacts", dies)
    with pytest.raises(OSError, match="connection reset"):
        registry.materialize(f"models:/{mv.name}/999")
    assert list(cache.iterdir()) == [entry]


def _materialize_in_a_new_process(uri):
    from pipeline import registry as reg
    path = reg.materialize(uri)
    return path, open(f"{path}/artifacts/anople/model.json").read()


def test_processes_fetching_the_same_version_at_once_share_one_whole_copy(mlflow_root, tmp_path):
    """A night's actors start together on a node: each may fetch before any has finished; the first rename
    wins, the others keep its copy and leave no partial folder behind."""
    import concurrent.futures
    import multiprocessing

    mv = _register("line6", "hub", tmp_path)
    uri = f"models:/{mv.name}/{mv.version}"
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = list(pool.map(_materialize_in_a_new_process, [uri] * 3))
    assert len({path for path, _ in got}) == 1 and all(text == "{}" for _, text in got)
    assert len(list((tmp_path / "model-cache").iterdir())) == 1


def test_a_fetch_that_loses_the_race_to_another_process_keeps_the_winners_copy(mlflow_root, tmp_path, monkeypatch):
    mv = _register("line5", "hub", tmp_path)
    uri = f"models:/{mv.name}/{mv.version}"
    real = registry.connect().artifacts.download_artifacts
    winner, raced = [], []

    def another_process_finishes_first(artifact_uri, dst_path):
        out = real(artifact_uri=artifact_uri, dst_path=dst_path)
        if not raced:  # while this fetch is still unrenamed, another process fetches and renames its own
            raced.append(True)
            with monkeypatch.context() as m:
                m.setattr(registry, "_FETCHED", {})
                winner.append(registry.materialize(uri))
        return out
    monkeypatch.setattr(registry.connect().artifacts, "download_artifacts", another_process_finishes_first)
    assert registry.materialize(uri) == winner[0]
    assert len(list((tmp_path / "model-cache").iterdir())) == 1  # the loser's partial folder is gone


def test_a_version_pruned_by_another_process_between_check_and_use_is_fetched_again(mlflow_root, tmp_path,
                                                                                    monkeypatch):
    mv = _register("line4", "hub", tmp_path)
    uri = f"models:/{mv.name}/{mv.version}"
    first = registry.materialize(uri)
    monkeypatch.setattr(registry, "_FETCHED", {})
    real_utime, pruned = os.utime, []

    def pruned_first(path, *args, **kwargs):  # another node-mate's pruner takes the folder just before the touch
        if not pruned:
            pruned.append(path)
            shutil.rmtree(path)
        return real_utime(path, *args, **kwargs)
    monkeypatch.setattr(registry.os, "utime", pruned_first)
    again = registry.materialize(uri)
    assert pruned and again == first and os.path.isfile(f"{again}/artifacts/anople/model.json")


def test_a_version_that_catches_fewer_of_the_plants_confirmed_defects_is_refused(mlflow_root, tmp_path, capsys):
    v1 = _register("line8", "hub", tmp_path)
    registry.record_evaluation(v1, {"image_auroc": 0.9}, 0, {"real_defect_recall": 1.0, "real_defects": 4})
    assert promote_job.main(["--deployment", "line8", "--version", "1", "--to", "production"]) == 0
    (tmp_path / "art-hub").rename(tmp_path / "art-hub-1")
    v2 = _register("line8", "hub", tmp_path)
    registry.record_evaluation(v2, {"image_auroc": 0.95}, 0, {"real_defect_recall": 0.5, "real_defects": 4})
    capsys.readouterr()
    assert promote_job.main(["--deployment", "line8", "--version", "2", "--to", "production"]) == 3
    assert "recall on the plant's confirmed defects is 50.0 %, below version 1's 100.0 %" in capsys.readouterr().err
    assert str(registry.get_version("line8", alias="production").version) == "1"
    assert promote_job.main(["--deployment", "line8", "--version", "2", "--to", "production", "--force"]) == 0
