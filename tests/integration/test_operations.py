"""The everyday operations through their command lines (`anople <verb>`), on real Ray, MLflow (sqlite) and local
storage: a product added without retraining, a night whose lighting shifts for one product caught as drift, an
operating point changed, inspectors' verdicts fed back. Each registers a candidate version with its lineage."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from jobs import anople
from pipeline import artifact, lineage, registry, storage
from pipeline.nightly import nights
from pipeline.sources.synthetic import make_mvtec_folder
from tests.browser import dump_dom, screenshot
from tests.conftest import TINY

pytestmark = pytest.mark.integration
D = "ops"


def _run(capsys, *argv):
    """`anople <argv> --json` in process: (exit code, its JSON summary, its human lines)."""
    code = anople.main(list(argv) + ["--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


def _night_folder(src, product, dest, camera_shift=0):
    """The product's normal test images as a night; `camera_shift` px: the camera moved sideways (the scene
    slides across the frame, as after a bumped mount)."""
    os.makedirs(dest, exist_ok=True)
    for name in sorted(os.listdir(f"{src}/{product}/test/good")):
        img = np.asarray(Image.open(f"{src}/{product}/test/good/{name}").convert("RGB"))
        Image.fromarray(np.roll(img, camera_shift, axis=1)).save(f"{dest}/{product}-{name}")
    return dest


@pytest.fixture(scope="module")
def plant(ray_local, tmp_path_factory):
    """A deployment trained on tile and washer, promoted (forced: random weights), one normal night scored."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("ops")
    mp.setenv("ANOPLE_ROOT", str(tmp / "root"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("ANOPLE_ARTIFACT_ROOT", raising=False)
    mp.setenv("ANOPLE_MODEL_CACHE", str(tmp / "cache"))
    src = make_mvtec_folder(str(tmp / "src"), products=("tile", "washer"), n_train=10, n_test_good=12,
                            n_test_defect=1, size=64, seed=3)
    new = make_mvtec_folder(str(tmp / "new"), products=("fabric",), n_train=6, n_test_good=2, n_test_defect=1,
                            size=64, seed=4)
    arch, out = str(tmp / "archive"), str(tmp / "out")
    codes = {}
    codes["ingest"] = anople.main(["ingest", src, "--archive", arch, "--deployment", D, "--date", "2026-11-01"])
    codes["train"] = anople.main(["train", "--deployment", D, "--archive", arch, "--shots", "2", "--backbone", TINY,
                                  "--weights", "random", "--epochs", "1", "--steps-per-epoch", "2"])
    codes["evaluate"] = anople.main(["evaluate", "--deployment", D, "--archive", arch])
    codes["promote"] = anople.main(["promote", "--deployment", D, "--from-alias", "candidate", "--to", "production",
                                    "--force"])
    for p in ("tile", "washer"):  # a normal night, then one whose tile camera moved 6 px (a tenth of the frame)
        codes[f"night1-{p}"] = anople.main(["ingest", _night_folder(src, p, str(tmp / "n1" / p)), "--archive", arch,
                                            "--deployment", D, "--date", "2026-11-02", "--product", p])
        codes[f"night2-{p}"] = anople.main(["ingest", _night_folder(src, p, str(tmp / "n2" / p),
                                                                    6 if p == "tile" else 0),
                                            "--archive", arch, "--deployment", D, "--date", "2026-11-03",
                                            "--product", p])
    codes["score1"] = anople.main(["score", "--deployment", D, "--archive", arch, "--date", "2026-11-02",
                                   "--output", out])
    assert set(codes.values()) == {0}, codes
    yield {"src": src, "new": new, "arch": arch, "out": out, "tmp": tmp}
    mp.undo()


def test_a_lighting_shift_on_one_product_is_flagged_the_night_it_starts(plant, capsys):
    night1 = storage.read_bytes(nights.Night(plant["out"], D, "2026-11-02").report_uri).decode()
    assert "No product drifted." in night1
    code, s, err = _run(capsys, "score", "--deployment", D, "--archive", plant["arch"], "--date", "2026-11-03",
                        "--output", plant["out"], "--fail-on-drift")
    assert code == 4, err  # after publishing: the night is whole, the scheduler stops
    night = nights.Night(plant["out"], D, "2026-11-03")
    assert night.published()["rows"] == 24 and s["rows_out"] == 24
    assert s["drift"]["flagged"] == ["tile"], s["drift"]
    tile = s["drift"]["products"]["tile"]["tests"]
    assert any(t["flagged"] and t["statistic"] is not None and t["threshold"] for t in tile)
    # the trailing baseline is the first night (same version), tested as well as the calibration normals
    trailing = [t for t in tile if t["baseline"] == "trailing"][0]
    assert trailing["n_baseline"] == 12 and trailing["flagged"]
    assert not s["drift"]["products"]["washer"]["flagged"]
    run = registry.client().get_run(s["run_id"])
    assert run.data.tags["drift_flagged"] == "tile" and run.data.metrics["drift.flagged.tile"] == 1.0
    assert run.data.metrics["drift.flagged.washer"] == 0.0
    dom = dump_dom(night.report_uri)
    assert "Drift flagged: tile" in dom and 'class="flag" data-product="tile" data-test="ks_2samp"' in dom
    png = str(plant["tmp"] / "drift-report.png")
    screenshot(night.report_uri, png)
    assert os.path.getsize(png) > 10_000


def test_a_new_product_is_added_without_retraining_and_scored_like_any_other(plant, capsys):
    assert anople.main(["ingest", plant["new"], "--archive", plant["arch"], "--deployment", D, "--date",
                        "2026-11-04"]) == 0
    parent = registry.get_version(D, alias="production")
    prompts_before = artifact.Files(registry.artifact_uri(parent)).read("prompts.safetensors")
    code, s, err = _run(capsys, "add-product", "--deployment", D, "--archive", plant["arch"], "--products", "fabric",
                        "--shots", "2", "--from-alias", "production")
    assert code == 0, err[-3000:]
    mv = registry.get_version(D, alias="candidate")
    assert str(mv.version) == s["version"] and mv.tags["parent_version"] == str(parent.version)
    assert mv.tags["operation"] == "add-product" and mv.tags["lineage"].startswith(f"v{mv.version} add-product <- ")
    spec = lineage.version_spec(mv)
    assert spec.products["fabric"].in_prompt_training is False and spec.products["tile"].in_prompt_training
    assert len(spec.products["fabric"].shots) == 2 and spec.anople["class_names"]["fabric"]
    files = artifact.Files(registry.artifact_uri(mv), registry.artifact_sha256(mv))
    assert files.read("prompts.safetensors") == prompts_before  # the parent's prompts, not retrained
    # evaluation treats it like any other product
    code, ev, err = _run(capsys, "evaluate", "--deployment", D, "--archive", plant["arch"])
    assert code == 0, err[-3000:]
    assert set(ev["per_product"]) == {"tile", "washer", "fabric"}
    # through the gate like any version (forced: random weights); the operations below start from it
    code, p, err = _run(capsys, "promote", "--deployment", D, "--from-alias", "candidate", "--to", "production",
                        "--force")
    assert code == 0 and p["version"] == s["version"], err[-3000:]
    assert "fabric" in p["operating_points"] and p["operating_points"]["fabric"]["threshold_old"] is None
    # adding a product the version holds is refused, nothing registered
    code, s2, _ = _run(capsys, "add-product", "--deployment", D, "--archive", plant["arch"], "--products", "tile",
                       "--shots", "2")
    assert code == 2 and "already holds tile" in s2["error"]
    assert str(registry.get_version(D, alias="candidate").version) == s["version"]


def test_an_operating_point_changes_without_retraining_and_promote_shows_both(plant, capsys):
    prod = registry.get_version(D, alias="production")
    old = lineage.version_spec(prod).products["tile"].threshold
    code, s, err = _run(capsys, "threshold", "--deployment", D, "--product", "tile", "--sensitivity", "0.5")
    assert code == 0, err[-3000:]
    cal = json.loads(lineage.open_parent(D, "production").files.read(artifact.fit_file("tile")))["calibration_scores"]
    assert s["new"]["threshold"] == pytest.approx(float(np.quantile(cal, 0.5)))
    assert s["old"]["threshold"] == pytest.approx(old) and s["new"]["threshold"] < old
    night = s["last_night"]
    assert night["date"] == "2026-11-03" and night["flags"]["new"] >= night["flags"]["old"]
    mv = registry.get_version(D, alias="candidate")
    ps = lineage.version_spec(mv).products["tile"]
    assert ps.operating_point["kind"] == "sensitivity" and ps.operating_point["calibrated"] == pytest.approx(old)
    # --value, and a bad one refused
    code, bad, _ = _run(capsys, "threshold", "--deployment", D, "--product", "tile", "--value", "-1")
    assert code == 2 and "finite positive" in bad["error"]
    # the gate shows both points with what each flags on the last night (then refuses: not evaluated)
    code, p, err = _run(capsys, "promote", "--deployment", D, "--from-alias", "candidate", "--to", "production")
    assert code == 3 and "no completed evaluation" in p["error"]
    assert p["operating_points"]["tile"]["threshold_old"] == pytest.approx(old)
    assert "operating points that change" in err and "tile" in err
    # and the night's report, rebuilt, shows the candidate's point beside the night's
    code, r, err = _run(capsys, "report", "--deployment", D, "--date", "2026-11-03", "--output", plant["out"])
    assert code == 0 and r["operating_points"]["tile"]["version"] == str(mv.version)
    assert "Operating points awaiting promotion" in dump_dom(r["report_uri"])
    assert r["lineage"] == "v1 train"  # the night was scored by the trained version


def test_inspectors_verdicts_flow_back_into_banks_thresholds_and_a_real_defect_set(plant, capsys, tmp_path):
    from pipeline.nightly.scorer import Scorer
    from pipeline.sources import archive
    from pipeline.sources.images import decode_image, to_model_input
    parent = registry.get_version(D, alias="production")
    pspec = lineage.version_spec(parent)
    # the night-2 tile images the production version scores highest: call them false alarms
    ids = archive.Partition(plant["arch"], D, "2026-11-03").image_ids(archive.Rows(products=("tile",)))
    images = archive.read_images(plant["arch"], D, "2026-11-03", ids)
    scorer = Scorer.load(registry.artifact_uri(parent), ["tile"], expected_sha256=registry.artifact_sha256(parent))

    def scores(sc, which):
        x = np.stack([to_model_input(decode_image(images[i]), pspec.image_size) for i in which])
        return sc.score(x, ["tile"] * len(which))[0]
    before = scores(scorer, ids)
    order = [ids[i] for i in np.argsort(-before)]
    normals, similar = order[:4], order[4:6]
    defect = archive.Partition(plant["arch"], D, "2026-11-01").image_ids(archive.Rows(split="test", products=("tile",)))
    labels = tmp_path / "verdicts.csv"
    defect_ids = [i for i in defect if "good" not in i][:2]
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "verdict", "date", "note"])
        for i in normals:
            w.writerow([i, "normal", "2026-11-03", "reflection, not a scratch"])
        w.writerow([normals[0], "normal", "2026-11-03", "entered twice"])
        for i in defect_ids:
            w.writerow([i, "defect", "2026-11-01", ""])
        w.writerow(["tile/no-such-image", "normal", "", ""])
        w.writerow([similar[1], "normal", "", "no date: archived on two nights"])
        w.writerow([similar[0], "maybe", "", ""])
    code, s, err = _run(capsys, "feedback", "--deployment", D, "--archive", plant["arch"], "--labels", str(labels))
    assert code == 0, err[-3000:]
    assert s["counts"] == {"rows": 10, "usable": 8, "normal": 4, "defect": 2, "problems": 4}
    problems = "\n".join(s["problems"])
    assert "repeated" in problems and "unknown image id" in problems and "unknown verdict 'maybe'" in problems
    assert f"{similar[1]}: archived 2 times (several nights): give its date" in problems
    t = s["per_product"]["tile"]
    n_shot = pspec.products["tile"].n_patches
    per_image = n_shot // 2
    assert t["bank_patches"][1] == n_shot + 4 * per_image and t["bank_bound"] == n_shot + 16 * per_image
    assert t["threshold"][1] <= t["threshold"][0]
    mv = registry.get_version(D, alias="candidate")
    assert mv.tags["operation"] == "feedback" and mv.tags["parent_version"] == str(parent.version)
    run = registry.client().get_run(mv.run_id)
    logged = [a.path for a in registry.client().list_artifacts(mv.run_id, "feedback")]
    assert logged and logged[0].endswith(".csv") and run.data.params["labels_sha256"] == s["labels_sha256"]
    # the false alarms and the images like them score lower against the new bank, under the new threshold
    new = Scorer.load(registry.artifact_uri(mv), ["tile"], expected_sha256=registry.artifact_sha256(mv))
    after = scores(new, normals + similar)
    assert (after[:4] < new.thresholds["tile"]).all()
    assert (after < scores(scorer, normals + similar) + 1e-6).all()
    # the confirmed defects are kept and the evaluation scores them; recall on them did not drop (the parent's
    # recall from its own scorer: an evaluation of production would cost a second Ray pass over the test split)
    code, ev, err = _run(capsys, "evaluate", "--deployment", D, "--archive", plant["arch"])
    assert code == 0, ev.get("error") or err[-3000:]
    assert ev["version"] == str(mv.version) and ev["real_defects"]["tile"]["n"] == 2
    ev_tag = registry.evaluation_of(registry.get_version(D, version=mv.version))
    assert ev_tag["real_defects"] == 2 and 0.0 <= ev_tag["real_defect_recall"] <= 1.0
    kept = archive.read_images(plant["arch"], D, "2026-11-01", defect_ids)
    x = np.stack([to_model_input(decode_image(kept[i]), pspec.image_size) for i in defect_ids])
    caught_before = int((scorer.score(x, ["tile"] * 2)[0] > scorer.thresholds["tile"]).sum())
    assert ev["real_defects"]["tile"]["caught"] >= caught_before
