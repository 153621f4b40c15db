import pytest

from jobs import promote as promote_job
from pipeline import registry


def _register(deployment, weights_kind, tmp_path):
    mlflow = registry.connect()
    art = tmp_path / f"art-{weights_kind}"
    art.mkdir()
    (art / "model.json").write_text("{}")
    with mlflow.start_run(experiment_id=registry.experiment_id(deployment)) as run:
        mlflow.log_artifacts(str(art), artifact_path="anople")
    return registry.register(deployment, run.info.run_id, "anople", {"weights_kind": weights_kind})


def test_register_sets_candidate_and_promotion_is_gated(mlflow_root, tmp_path, capsys):
    v1 = _register("line9", "hub", tmp_path)
    v2 = _register("line9", "random", tmp_path)
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    assert str(registry.get_version("line9", alias="candidate").version) == "2"
    assert str(mlflow_root) in registry.tracking_uri()
    # the random-weights candidate is refused...
    rc = promote_job.main(["--deployment", "line9", "--from-alias", "candidate", "--to", "production"])
    assert rc == 3 and "random-init" in capsys.readouterr().err
    with pytest.raises(LookupError):
        registry.get_version("line9", alias="production")
    # ...a real-weights version by number is not, and --force overrides the gate
    assert promote_job.main(["--deployment", "line9", "--version", "1", "--to", "production"]) == 0
    assert str(registry.get_version("line9", alias="production").version) == "1"
    assert promote_job.main(["--deployment", "line9", "--version", "2", "--to", "production", "--force"]) == 0
    assert "RANDOM-INIT" in capsys.readouterr().out
    mv = registry.get_version("line9", alias="production")
    assert str(mv.version) == "2" and set(mv.aliases) == {"candidate", "production"}
    assert registry.artifact_uri(mv).endswith("/anople")


def test_missing_model_is_a_clear_error(mlflow_root, capsys):
    assert promote_job.main(["--deployment", "nothere", "--version", "1", "--to", "production"]) == 2
    assert "anople-nothere" in capsys.readouterr().err
