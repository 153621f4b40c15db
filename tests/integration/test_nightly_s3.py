"""The whole nightly path on a real S3 API (moto server), real Ray and MLflow on sqlite:
ingest -> train -> evaluate -> promote -> score, archive, model artifacts and outputs all in S3."""
import io
import json
import os

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import evaluate as evaluate_job
from jobs import ingest as ingest_job
from jobs import promote as promote_job
from jobs import score as score_job
from jobs import train as train_job
from pipeline import registry, serving, storage
from pipeline.nightly import nights
from pipeline.sources import archive
from pipeline.sources.images import HEATMAP_RANGE, decode_heatmap
from tests.browser import dump_dom
from tests.conftest import TINY

pytestmark = pytest.mark.integration


def _upload_folder(local, bucket, prefix):
    s3 = boto3.client("s3")
    for root, _, files in os.walk(local):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), local)
            s3.upload_file(os.path.join(root, f), bucket, f"{prefix}/{rel}")


def _read_scores(uri):
    fs, path = storage.arrow_filesystem(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


def _write_foreign_shard(uri, image_path):
    """A shard another tool wrote into the night: two rows share an image_id, one has none."""
    data = open(image_path, "rb").read()
    rows = [{"image_id": i, "product": "washer", "image": data, "split": "test"} for i in ("washer/dup", "washer/dup", None)]
    fs, path = storage.arrow_filesystem(uri)
    pq.write_table(pa.Table.from_pylist(rows, schema=archive.SCHEMA), path, filesystem=fs)


@pytest.fixture(scope="module")
def nightly(request, bucket, ray_local, synthetic_src, tmp_path_factory):
    """Run the jobs once, as a plant would; the tests below check what they left behind."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("root")
    mp.setenv("ANOPLE_ROOT", str(root))
    mp.setenv("ANOPLE_ARTIFACT_ROOT", f"s3://{bucket}/mlartifacts")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    _upload_folder(synthetic_src, bucket, "incoming/mvtec")
    arch, out = f"s3://{bucket}/archive", f"s3://{bucket}/results"

    night = tmp_path_factory.mktemp("night")
    for name in ("000.png", "001.png", "002.png"):
        Image.open(f"{synthetic_src}/washer/test/good/{name}").save(night / name)
    (night / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _upload_folder(str(night), bucket, "incoming/night/washer")
    gear = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(gear, format="PNG")
    boto3.client("s3").put_object(Bucket=bucket, Key="incoming/night/gear/g1.png", Body=gear.getvalue())

    rc = {}
    rc["ingest"] = ingest_job.main([f"s3://{bucket}/incoming/mvtec", "--archive", arch, "--deployment", "line1",
                                    "--date", "2026-11-20"])
    rc["ingest_night"] = ingest_job.main([f"s3://{bucket}/incoming/night/washer", "--archive", arch,
                                          "--deployment", "line1", "--date", "2026-11-21", "--product", "washer"])
    rc["ingest_gear"] = ingest_job.main([f"s3://{bucket}/incoming/night/gear", "--archive", arch,
                                         "--deployment", "line1", "--date", "2026-11-21", "--product", "gear"])
    _write_foreign_shard(f"{arch}/deployment=line1/date=2026-11-21/from-another-tool.parquet",
                         f"{night}/000.png")
    rc["train"] = train_job.main(["--deployment", "line1", "--archive", arch, "--shots", "2", "--seed", "0",
                                  "--backbone", TINY, "--weights", "random", "--epochs", "2",
                                  "--steps-per-epoch", "2"])
    rc["evaluate"] = evaluate_job.main(["--deployment", "line1", "--archive", arch])
    rc["promote_refused"] = promote_job.main(["--deployment", "line1", "--from-alias", "candidate", "--to", "production"])
    rc["promote"] = promote_job.main(["--deployment", "line1", "--from-alias", "candidate", "--to", "production", "--force"])
    rc["score"] = score_job.main(["--deployment", "line1", "--archive", arch, "--date", "2026-11-21", "--output", out])
    yield {"rc": rc, "arch": arch, "out": out, "bucket": bucket, "night": str(night)}
    mp.undo()


def test_every_job_succeeded_and_the_gate_held(nightly):
    assert nightly["rc"] == {"ingest": 0, "ingest_night": 0, "ingest_gear": 0, "train": 0, "evaluate": 0,
                             "promote_refused": 3, "promote": 0, "score": 0}


def test_prompt_training_checkpointed_every_epoch_and_logged(nightly):
    mv = registry.get_version("line1", alias="candidate")
    run = registry.connect().get_run(mv.run_id)
    key = run.data.params["run_key"]
    ckpts = storage.list_files(os.path.join(os.environ["ANOPLE_ROOT"], "ray_results", key, "prompt-checkpoints"))
    assert [c.rsplit("/", 1)[1] for c in ckpts] == ["epoch-0001.pt", "epoch-0002.pt"]
    assert run.data.params["anople.prompt_mode"] == "bi" and run.data.params["anople.epochs"] == "2"
    history = registry.client().get_metric_history(mv.run_id, "loss_total")
    assert [m.step for m in history] == [1, 2]
    # logged as training went: epoch 1's point predates epoch 2's checkpoint (was: all logged after the fit)
    second = os.path.getmtime(ckpts[1])
    assert history[0].timestamp / 1000 <= second + 0.5
    # the validation curve, and what training added over the bank on it, in the run
    assert [m.step for m in registry.client().get_metric_history(mv.run_id, "val_fused_pixel_auroc")] == [1, 2]
    assert "val_gain_pixel_auroc" in run.data.metrics and run.data.tags["validation"].startswith("validation (")
    assert storage.exists(storage.join(run.info.artifact_uri, "validation.json"))
    assert storage.exists(registry.artifact_uri(mv) + "/prompts.safetensors")


def test_the_evaluation_left_curves_a_table_and_examples_in_its_run(nightly, tmp_path):
    mv = registry.get_version("line1", alias="production")
    client = registry.client()
    names = {a.path for a in client.list_artifacts(mv.run_id, "evaluation/curves")}
    products = sorted(mv.tags.get("products", "") or archive.products_in(nightly["arch"], "line1"))
    assert names == {f"evaluation/curves/{p}.png" for p in products}
    table = json.loads(open(client.download_artifacts(mv.run_id, "evaluation/per_product.json", str(tmp_path))).read())
    cols = table["columns"]
    rows = [dict(zip(cols, r)) for r in table["data"]]
    assert sorted(r["product"] for r in rows) == products and all(0 <= r["pixel_auroc"] <= 100 for r in rows)
    for p in products:
        shots = [a.path for a in client.list_artifacts(mv.run_id, f"evaluation/examples/{p}")]
        assert any("defective-top" in a for a in shots) and any("normal-top" in a for a in shots)
    png = client.download_artifacts(mv.run_id, f"evaluation/curves/{products[0]}.png", str(tmp_path))
    img = np.asarray(Image.open(png).convert("L"))
    assert img.shape[1] > 600 and img.std() > 10  # a drawn figure, not an empty canvas


def test_registry_holds_the_version_with_both_aliases(nightly):
    mv = registry.get_version("line1", alias="production")
    assert set(mv.aliases) == {"candidate", "production"}
    assert mv.tags["weights_kind"] == "random"
    assert registry.artifact_uri(mv).startswith(f"s3://{nightly['bucket']}/mlartifacts/")
    run = registry.connect().get_run(mv.run_id)
    assert run.data.tags["random_weights"] == "true" and "RANDOM-INIT" in run.data.tags["warning"]
    assert run.data.params["threshold_source.washer"] == "heldout_normals"
    assert 0.0 <= run.data.metrics["eval.image_auroc.mean"] <= 1.0
    assert "eval.aupro.washer" in run.data.metrics


def test_one_score_row_per_input_row_with_errors_reported(nightly):
    rows = _read_scores(f"{nightly['out']}/scores/deployment=line1/date=2026-11-21")
    assert sorted(r["image_id"] or "" for r in rows) == ["", "gear/g1", "washer/000", "washer/001", "washer/002",
                                                        "washer/corrupt", "washer/dup", "washer/dup"]
    by_id = {r["image_id"]: r for r in rows}
    assert by_id["washer/corrupt"]["status"] == "error" and "cannot decode" in by_id["washer/corrupt"]["error"]
    assert by_id["gear/g1"]["status"] == "error" and "unknown product 'gear'" in by_id["gear/g1"]["error"]
    # rows another tool wrote: a repeated image_id scores neither copy, a missing one is named
    for r in rows:
        if r["image_id"] in ("washer/dup", None):
            assert r["status"] == "error" and (r["score"] is None or np.isnan(r["score"]))
            assert ("duplicate image_id" if r["image_id"] else "no image_id") in r["error"]
            assert r["heatmap_uri"] is None
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 3
    for r in ok:
        assert r["model_name"] == "anople-line1" and r["run_id"] and "deployment" not in r  # the path's
        assert r["source_uri"] == f"s3://{nightly['bucket']}/incoming/night/{r['image_id']}.png"
        assert np.isfinite(r["score"]) and r["threshold"] > 0 and r["is_anomalous"] == (r["score"] > r["threshold"])
        png = storage.read_bytes(r["heatmap_uri"])
        with Image.open(io.BytesIO(png)) as img:
            assert max(img.size) <= 64 and img.mode in ("I;16", "I")  # 16-bit, at most the model's input side
        assert (r["height"], r["width"]) == (64, 64)  # the source's size: the decode rule's target
        assert r["heatmap_scale"] == pytest.approx(HEATMAP_RANGE * r["threshold"])  # fixed per product
        assert decode_heatmap(png, size=(r["height"], r["width"])).shape == (64, 64)


def test_the_night_has_a_report_in_s3_and_in_mlflow_that_a_browser_renders(nightly, tmp_path):
    uri = nights.Night(nightly["out"], "line1", "2026-11-21").report_uri
    assert uri.startswith(f"s3://{nightly['bucket']}/results/reports/")
    local = tmp_path / "report.html"
    local.write_bytes(storage.read_bytes(uri))  # as a user downloads it: self-contained, no links back to S3
    dom = dump_dom(str(local))
    assert 'data-product="washer"' in dom and 'data-product="gear"' in dom
    assert 'data-overlays-loaded="3"' in dom  # the three scored washers, image and heatmap overlay each
    assert "unknown product 'gear'" in dom and "duplicate image_id" in dom and "cannot decode" in dom
    run = registry.client().get_run(nightly_published_run(nightly))
    assert run.data.metrics["scored.washer"] == 3 and run.data.metrics["error.washer"] == 4
    assert run.data.metrics["error.gear"] == 1 and run.data.tags["report"] == uri
    assert registry.connect().artifacts.load_text(f"runs:/{run.info.run_id}/report/report.html") == local.read_text()


def nightly_published_run(nightly) -> str:
    return nights.Night(nightly["out"], "line1", "2026-11-21").published()["run_id"]


def test_rerun_overwrites_instead_of_duplicating(nightly):
    assert score_job.main(["--deployment", "line1", "--archive", nightly["arch"], "--date", "2026-11-21",
                           "--output", nightly["out"]]) == 0
    rows = _read_scores(f"{nightly['out']}/scores/deployment=line1/date=2026-11-21")
    assert len(rows) == 8
    assert len(storage.list_files(f"{nightly['out']}/heatmaps/deployment=line1/date=2026-11-21")) == 3


def test_sharded_and_unsharded_scoring_agree(nightly, capsys):
    """A tiny per-actor budget forces one bank shard per product; the scores must not change."""
    base = ["--deployment", "line1", "--archive", nightly["arch"], "--date", "2026-11-20"]
    assert score_job.main(base + ["--output", nightly["out"] + "/whole"]) == 0
    assert score_job.main(base + ["--output", nightly["out"] + "/sharded", "--bank-budget-mb", "0.001"]) == 0
    assert "(3 bank shard(s))" in capsys.readouterr().out
    whole = {r["image_id"]: r["score"] for r in _read_scores(f"{nightly['out']}/whole/scores/deployment=line1/date=2026-11-20")}
    sharded = {r["image_id"]: r["score"] for r in _read_scores(f"{nightly['out']}/sharded/scores/deployment=line1/date=2026-11-20")}
    assert whole.keys() == sharded.keys() and len(whole) == 30
    assert all(np.isfinite(v) for v in whole.values())
    # Same scores. Bit-for-bit for the bank path; the decoder's convolutions and matmuls see batches of
    # other sizes when routed per shard, which moves float32 results in the 8th digit, never more.
    keys = sorted(whole)
    assert np.allclose([whole[k] for k in keys], [sharded[k] for k in keys], rtol=1e-6, atol=0)


def _serving_frame(night_dir):
    import pandas as pd
    with open(f"{night_dir}/000.png", "rb") as f:
        good = f.read()
    return pd.DataFrame({"image": [good, b"not an image", good], "product": ["washer", "washer", "gear"],
                         "image_id": ["washer/000", "bad", "gear/x"]})


def test_the_version_is_an_mlflow_model_notebooks_load(nightly):
    """mlflow.pyfunc.load_model on the registry alias scores image bytes like the nightly job did."""
    import mlflow

    registry.connect()
    model = mlflow.pyfunc.load_model("models:/anople-line1@production")
    assert model.metadata.get_input_schema().input_names() == ["image", "product", "image_id"]
    out = model.predict(_serving_frame(nightly["night"]))
    assert list(out["status"]) == ["ok", "error", "error"]
    assert "cannot decode image" in out["error"][1] and "unknown product 'gear'" in out["error"][2]
    assert out["score"][1:].isna().all() and not out["is_anomalous"][1:].any()
    nightly_score = {r["image_id"]: r["score"] for r in
                     _read_scores(f"{nightly['out']}/scores/deployment=line1/date=2026-11-21")}["washer/000"]
    assert out["score"][0] == pytest.approx(nightly_score, rel=1e-5)  # the same model, the same score


def test_mlflow_models_serve_answers_invocations(nightly):
    """The real `mlflow models serve --env-manager local` on loopback, image bytes base64 in the JSON."""
    import base64
    import json
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.conftest import free_port

    frame = _serving_frame(nightly["night"])
    port = free_port()
    # the serving command runs `uvicorn` from PATH: the environment's bin folder, as an activated venv has it
    env = dict(os.environ, MLFLOW_TRACKING_URI=registry.tracking_uri(),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/anople-line1@production",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        body = json.dumps({"dataframe_split": {"columns": ["image", "product"], "data": [
            [base64.b64encode(b).decode(), p] for b, p in zip(frame["image"], frame["product"])]}}).encode()
        deadline, answer = time.time() + 120, None
        while answer is None and time.time() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                raw = urllib.request.urlopen(req, timeout=30).read()
            except OSError:
                time.sleep(1)
                continue

            def not_json(token):  # Python's json reads NaN / Infinity; JSON (RFC 8259) and strict parsers do not
                raise AssertionError(f"the answer holds a bare {token}, which is not JSON")
            answer = json.loads(raw, parse_constant=not_json)
        assert answer is not None, proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "no answer"
        rows = answer["predictions"]
        assert [r["status"] for r in rows] == ["ok", "error", "error"] and rows[0]["score"] > 0
        assert rows[1]["score"] is None and rows[2]["score"] is None and rows[2]["threshold"] is None  # null
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_mlflow_model_is_code_from_the_installed_package_with_its_manifests_hash(nightly):
    """No pickled model object and no copy of the package in the model folder: loading it runs the installed
    pipeline's code; the manifest's SHA-256 is in the model's config and on the version (issue 23)."""
    import yaml

    from pipeline import artifact

    registry.connect()
    mv = registry.get_version("line1", alias="production")
    root = mv.source.rstrip("/")
    rel = [f[len(root) + 1:] for f in storage.list_files(root)]
    assert not [f for f in rel if f.endswith((".pkl", ".pickle", ".cloudpickle")) or f.startswith("code/")], rel
    pyfunc = yaml.safe_load(storage.read_bytes(f"{root}/MLmodel"))["flavors"]["python_function"]
    digest = registry.artifact_sha256(mv)
    assert digest and pyfunc["config"]["artifact_sha256"] == digest and "loader_module" in pyfunc
    assert artifact.sha256(storage.read_bytes(f"{registry.model_source(mv)}/{artifact.MANIFEST}")) == digest


def test_a_model_changed_in_the_store_is_refused_before_any_row_scores(nightly, capsys):
    """A threshold raised in the registered folder (and the manifest rewritten to match): the night, the notebook
    load and the evaluation refuse it (exit 3), naming the manifest; nothing is published over the last night."""
    import mlflow

    from pipeline import artifact

    registry.connect()
    mv = registry.get_version("line1", alias="production")
    src = registry.model_source(mv)
    spec_uri = f"{src}/model.json"
    original = {u: storage.read_bytes(u) for u in (spec_uri, f"{src}/{artifact.MANIFEST}")}
    before = nights.Night(nightly["out"], "line1", "2026-11-21").published()["run_id"]
    try:
        d = json.loads(original[spec_uri])
        for p in d["products"].values():
            p["threshold"] = 1e9  # every alarm off
        with __import__("tempfile").TemporaryDirectory() as tmp:
            for u in storage.list_files(src):
                local = os.path.join(tmp, u[len(src) + 1:])
                os.makedirs(os.path.dirname(local), exist_ok=True)
                open(local, "wb").write(json.dumps(d).encode() if u == spec_uri else storage.read_bytes(u))
            artifact.write_manifest(tmp)
            storage.write_bytes(spec_uri, open(os.path.join(tmp, "model.json"), "rb").read())
            storage.write_bytes(f"{src}/{artifact.MANIFEST}", open(os.path.join(tmp, artifact.MANIFEST), "rb").read())
        capsys.readouterr()
        assert score_job.main(["--deployment", "line1", "--archive", nightly["arch"], "--date", "2026-11-21",
                               "--output", nightly["out"]]) == 3
        assert "manifest.json is not the one registered" in capsys.readouterr().err
        assert nights.Night(nightly["out"], "line1", "2026-11-21").published()["run_id"] == before
        assert evaluate_job.main(["--deployment", "line1", "--archive", nightly["arch"],
                                  "--model-alias", "production"]) == 3
        with pytest.raises(artifact.ModelRefused, match="manifest.json is not the one registered"):
            mlflow.pyfunc.load_model(f"models:/anople-line1/{mv.version}")  # MLmodel's own record
        # whoever rewrote the manifest can rewrite MLmodel's record too; the registry's record still refuses
        mlmodel = f"{mv.source.rstrip('/')}/MLmodel"
        original[mlmodel] = storage.read_bytes(mlmodel)
        forged = artifact.sha256(storage.read_bytes(f"{src}/{artifact.MANIFEST}"))
        storage.write_bytes(mlmodel, original[mlmodel].replace(registry.artifact_sha256(mv).encode(), forged.encode()))
        with pytest.raises(artifact.ModelRefused, match="manifest.json is not the one registered"):
            serving.load_registered("line1", "production")
    finally:
        for u, data in original.items():
            storage.write_bytes(u, data)


def test_the_operations_run_on_s3_archive_artifacts_and_labels(nightly, tmp_path, capsys):
    """add-product, threshold and feedback with the archive, the model artifacts and the labels file in S3; the
    night's drift test left its result there. (Last in the module: it adds a product to the archive.)"""
    from jobs import anople
    from pipeline import lineage
    from pipeline.nightly import drift
    from pipeline.sources.synthetic import make_mvtec_folder
    arch, bucket = nightly["arch"], nightly["bucket"]
    night = nights.Night(nightly["out"], "line1", "2026-11-21")
    found = drift.read_result(night)
    assert drift.result_uri(night).startswith("s3://") and set(found["products"]) == {"washer"}
    _upload_folder(make_mvtec_folder(str(tmp_path / "pill"), products=("pill",), n_train=4, n_test_good=1,
                                     n_test_defect=1, size=64, seed=9), bucket, "incoming/pill")
    assert anople.main(["ingest", f"s3://{bucket}/incoming/pill", "--archive", arch, "--deployment", "line1",
                        "--date", "2026-11-22"]) == 0
    capsys.readouterr()

    def run(*argv):
        code = anople.main(list(argv) + ["--json"])
        out, err = capsys.readouterr()
        return code, json.loads(out.strip().splitlines()[-1]), err
    parent = registry.get_version("line1", alias="production")
    code, s, err = run("add-product", "--deployment", "line1", "--archive", arch, "--products", "pill", "--shots", "2")
    assert code == 0, s.get("error") or err[-2000:]
    mv = registry.get_version("line1", alias="candidate")
    assert registry.artifact_uri(mv).startswith(f"s3://{bucket}/") and mv.tags["parent_version"] == str(parent.version)
    assert lineage.version_spec(mv).products["pill"].in_prompt_training is False
    code, s, err = run("threshold", "--deployment", "line1", "--product", "washer", "--value", "0.5")
    assert code == 0 and s["new"]["threshold"] == 0.5 and s["last_night"]["scored"] > 0, err[-2000:]
    ids = archive.Partition(arch, "line1", "2026-11-21").image_ids(archive.Rows(products=("washer",)))
    labels = "image_id,verdict,date\n" + "".join(f"{i},normal,2026-11-21\n" for i in ids if i != "washer/dup")
    storage.write_bytes(f"s3://{bucket}/labels/verdicts.csv", labels.encode())
    code, s, err = run("feedback", "--deployment", "line1", "--archive", arch, "--labels",
                       f"s3://{bucket}/labels/verdicts.csv")
    assert code == 0, s.get("error") or err[-2000:]
    # the undecodable night image is reported, never put into a bank
    assert s["counts"]["normal"] >= 3 and any("does not decode" in p for p in s["problems"])
    assert s["per_product"]["washer"]["bank_patches"][1] > s["per_product"]["washer"]["bank_patches"][0]
    assert registry.get_version("line1", alias="candidate").tags["operation"] == "feedback"
