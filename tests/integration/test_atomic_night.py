"""A scoring run killed part-way, then rerun, the way a plant's scheduler does it: readers never see a
partial night, the killed run is marked failed, and the rerun publishes every row exactly once."""
import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pads
import pytest
import torch

from jobs import ingest as ingest_job
from jobs import promote as promote_job
from jobs import score as score_job
from jobs import train as train_job
from pipeline import registry, storage
from pipeline.model.backbone import create_clip
from pipeline.nightly import nights
from pipeline.sources import archive
from pipeline.sources.synthetic import make_mvtec_folder
from tests.conftest import SECRET_MARKER, TINY

pytestmark = pytest.mark.integration
DATE = "2026-11-22"
SMALL = "2026-11-23"


@pytest.fixture(scope="module")
def plant(ray_local, synthetic_src, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("atomic")
    mp.setenv("ANOPLE_ROOT", str(root / "root"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("ANOPLE_ARTIFACT_ROOT", raising=False)
    arch, out = str(root / "archive"), str(root / "out")
    night = make_mvtec_folder(str(root / "night"), ("tile", "washer"), n_train=0, n_test_good=17, n_test_defect=1,
                              size=64, seed=5)
    assert ingest_job.main([synthetic_src, "--archive", arch, "--deployment", "an", "--date", "2026-11-20"]) == 0
    for p in ("tile", "washer"):
        assert ingest_job.main([f"{night}/{p}/test", "--archive", arch, "--deployment", "an", "--date", DATE,
                                "--product", p]) == 0
    ckpt = root / "clip.pt"  # random weights behind a file name: the gate must still see them
    torch.save(create_clip(TINY, "random", seed=0).state_dict(), ckpt)
    small = make_mvtec_folder(str(root / "small"), ("tile",), n_train=0, n_test_good=1, n_test_defect=1,
                              size=64, seed=6)  # 4 rows (1 good, 3 defect types): a night to crash in
    assert ingest_job.main([f"{small}/tile/test", "--archive", arch, "--deployment", "an", "--date", SMALL,
                            "--product", "tile"]) == 0
    assert train_job.main(["--deployment", "an", "--archive", arch, "--shots", "1", "--backbone", TINY,
                           "--weights", f"file://{ckpt}", "--prompt-mode", "none"]) == 0
    assert registry.get_version("an", alias="candidate").tags["weights_kind"] == "random"
    assert promote_job.main(["--deployment", "an", "--from-alias", "candidate", "--to", "production"]) == 3
    assert promote_job.main(["--deployment", "an", "--from-alias", "candidate", "--to", "production", "--force"]) == 0
    yield {"arch": arch, "out": out, "root": root, "n": 40}
    mp.undo()


def _night(out, date=DATE):
    fs, path = storage.arrow_filesystem(nights.Night(out, "an", date).uri)
    t = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_id", "score", "run_id",
                                                                            "heatmap_uri", "status"])
    return sorted(zip(t["image_id"].to_pylist(), t["score"].to_pylist(), t["run_id"].to_pylist(),
                      t["heatmap_uri"].to_pylist(), t["status"].to_pylist()))


def _every_reader_sees(plant, image_ids):
    """pandas, pyarrow (hive) and DuckDB on the whole scores/ tree: the night's rows once, with the path's
    deployment and date and each row's source file."""
    import duckdb
    import pandas as pd

    tree = os.path.join(plant["out"], "scores")
    df = pd.read_parquet(tree)
    df = df[df["date"].astype(str) == DATE]
    assert sorted(df["image_id"]) == image_ids and set(df["deployment"].astype(str)) == {"an"}
    t = pads.dataset(tree, format="parquet", partitioning="hive").to_table(filter=pads.field("date") == DATE)
    assert sorted(t["image_id"].to_pylist()) == image_ids
    rows = duckdb.sql(f"select image_id, source_uri from read_parquet('{tree}/**/*.parquet', hive_partitioning=true) "
                      f"where date = '{DATE}' order by image_id").fetchall()
    assert [r[0] for r in rows] == image_ids and all(r[1].endswith(".png") for r in rows)


def _start_and_kill(plant, sig, earlier):
    """Start jobs.score as its own process; signal it once it has committed its first staged rows (mid-run)."""
    cmd = [sys.executable, "-m", "jobs.score", "--deployment", "an", "--archive", plant["arch"], "--date", DATE,
           "--output", plant["out"], "--batch-size", "2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a cron job starts
    env["ANOPLE_STAGE_ROWS"] = "4"  # commits every 4 rows: the kill lands with some of the night committed
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    night = nights.Night(plant["out"], "an", DATE)
    seen = set()
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        seen = night.runs_with_files() - set(earlier)
        if any(night.parts(r) for r in seen):
            break
        time.sleep(0.2)
    assert proc.poll() is None and seen, "the run ended before it could be killed"
    during = _night(plant["out"])
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)  # the job and its local Ray, all at once
    else:
        os.kill(proc.pid, sig)  # a scheduler's stop: the job unwinds, its Ray goes with it
    proc.wait(60)
    return seen.pop(), during


def _committed(plant, run) -> set[str]:
    """The image_ids a run committed to staging (what a rerun may adopt)."""
    night = nights.Night(plant["out"], "an", DATE)
    return nights.plan_resume(night, night.run_record(run)["key"], {run}, ()).image_ids


def test_killed_runs_leave_the_previous_night_and_a_rerun_resumes_it(plant, capsys):
    """Issue 24, item 4: each killed run's committed rows are adopted by the rerun, which scores only the rest."""
    assert score_job.main(["--deployment", "an", "--archive", plant["arch"], "--date", DATE,
                           "--output", plant["out"]]) == 0
    first = _night(plant["out"])
    run1 = first[0][2]
    assert len(first) == plant["n"] and {r[2] for r in first} == {run1}
    _every_reader_sees(plant, [r[0] for r in first])

    killed, during = _start_and_kill(plant, signal.SIGKILL, {run1})
    assert during == first and _night(plant["out"]) == first  # during and after the kill: the old night, whole
    c = registry.client()
    assert c.get_run(killed).info.status == "RUNNING"  # SIGKILL: nobody could mark it
    by_killed = _committed(plant, killed)

    # a scheduler's stop of the next run: it had adopted the killed run's rows and scored some more
    termed, _ = _start_and_kill(plant, signal.SIGTERM, {run1, killed})
    assert _night(plant["out"]) == first
    by_termed = _committed(plant, termed)
    assert by_killed and by_termed and not by_killed & by_termed  # the second run scored only the rest

    capsys.readouterr()
    assert score_job.main(["--deployment", "an", "--archive", plant["arch"], "--date", DATE,
                           "--output", plant["out"]]) == 0
    out = capsys.readouterr().out
    resumed = len(by_killed) + len(by_termed)
    assert (f"resumed: {resumed} rows adopted from run(s) {', '.join(sorted([killed, termed]))}; "
            f"{plant['n'] - resumed} scored by this run") in out
    after = _night(plant["out"])
    run3 = nights.Night(plant["out"], "an", DATE).published()["run_id"]
    assert run3 not in (run1, killed, termed)
    assert [r[0] for r in after] == [r[0] for r in first]  # every row once: 0 missing, 0 duplicated
    who = {r[0]: r[2] for r in after}  # each row names the run that scored it
    assert {i for i, r in who.items() if r == killed} == by_killed
    assert {i for i, r in who.items() if r == termed} == by_termed
    assert sum(r == run3 for r in who.values()) == plant["n"] - resumed
    assert c.get_run(killed).info.status == "FAILED" and "killed" in c.get_run(killed).data.tags["failure"]
    assert c.get_run(termed).info.status == "FAILED"  # by itself at exit, or by the rerun
    # staging is gone; the heatmaps stay of exactly the runs the published rows point at
    assert nights.Night(plant["out"], "an", DATE).runs_with_files() == {run3, killed, termed}
    for _, _, _, uri, status in after:
        assert status != "ok" or storage.exists(uri)

    # the same night again with --skip-published: nothing rescored, the night as it was
    assert score_job.main(["--deployment", "an", "--archive", plant["arch"], "--date", DATE,
                           "--output", plant["out"], "--skip-published"]) == 0
    assert "nothing rescored" in capsys.readouterr().out
    assert nights.Night(plant["out"], "an", DATE).published()["run_id"] == run3


def test_no_credential_reaches_a_log_a_store_or_the_output(plant, capfd):
    """After train, evaluate-less promote and three scoring runs (above): grep Ray's session folder, the MLflow
    store (sqlite and artifacts), the outputs and this process's captured output for the session's secret."""
    import ray

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_MARKER  # the secret every S3 client here uses
    assert score_job.main(["--deployment", "an", "--archive", plant["arch"], "--date", DATE,
                           "--output", plant["out"]]) == 0
    places = [ray._private.worker._global_node.get_session_dir_path(), str(plant["root"])]
    leaks = []
    for place in places:
        for folder, _, files in os.walk(place):
            for name in files:
                path = os.path.join(folder, name)
                try:
                    with open(path, "rb") as f:
                        if SECRET_MARKER.encode() in f.read():
                            leaks.append(path)
                except OSError:
                    continue
    out = capfd.readouterr()
    assert not leaks and SECRET_MARKER not in out.out + out.err, leaks
    assert sum(len(files) for place in places for _, _, files in os.walk(place)) > 20  # the grep saw something


def test_a_row_that_kills_its_process_becomes_an_error_row_and_the_night_completes(plant):
    from pipeline.nightly.run import ScoreOptions, score_night
    from pipeline.nightly.stages import InjectedFault

    ids = sorted(archive_ids(plant["arch"], SMALL))
    poison = ids[len(ids) // 2]
    s = score_night(archive.Partition(plant["arch"], "an", SMALL), plant["out"], ScoreOptions(max_error_rate=0.25),
                    fault=InjectedFault(frozenset({poison})))
    rows = {r[0]: r for r in _night(plant["out"], SMALL)}
    assert sorted(rows) == ids and s["rows_out"] == len(ids)  # every row once
    _, score, _, uri, status = rows[poison]
    assert status == "error" and score is None and uri is None
    assert all(r[4] == "ok" for i, r in rows.items() if i != poison) and s["infra_errors"] == 1
    err = registry.client().get_run(s["run_id"]).data.metrics["infra_errors"]
    assert err == 1
    fs, path = storage.arrow_filesystem(nights.Night(plant["out"], "an", SMALL).uri)
    errors = dict(zip(*pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["image_id", "error"]).to_pydict().values()))
    assert errors[poison].startswith("scoring process crashed on this image")


def test_more_infrastructure_errors_than_allowed_fail_the_run_and_publish_nothing(plant):
    from pipeline.nightly.run import ScoreOptions, TooManyErrors, score_night
    from pipeline.nightly.stages import InjectedFault

    ids = sorted(archive_ids(plant["arch"], SMALL))
    before = score_night(archive.Partition(plant["arch"], "an", SMALL), plant["out"])
    published = _night(plant["out"], SMALL)
    failing = InjectedFault(frozenset(ids[:2]), kind="raise")  # scoring raises on 2 of 4 rows
    with pytest.raises(TooManyErrors, match="2 of 4 rows failed for infrastructure reasons"):
        score_night(archive.Partition(plant["arch"], "an", SMALL), plant["out"], ScoreOptions(max_error_rate=0.2),
                    fault=failing)
    assert _night(plant["out"], SMALL) == published and nights.Night(plant["out"], "an", SMALL).published()["run_id"] == before["run_id"]
    s = score_night(archive.Partition(plant["arch"], "an", SMALL), plant["out"], ScoreOptions(max_error_rate=0.5),
                    fault=failing)  # within budget
    rows = {r[0]: r for r in _night(plant["out"], SMALL)}
    assert s["infra_errors"] == 2 and [rows[i][4] for i in ids[:2]] == ["error", "error"]


def archive_ids(arch, date):
    from pipeline.sources import archive
    return archive.read_table(arch, "an", date, columns=["image_id"])["image_id"].to_pylist()


def test_evaluation_with_an_unusable_mask_exits_non_zero_and_marks_nothing(plant, tmp_path, capsys):
    from PIL import Image

    from jobs import evaluate as evaluate_job

    src = make_mvtec_folder(str(tmp_path / "eval"), ("tile",), n_train=0, n_test_good=1, n_test_defect=1, size=64, seed=7)
    Image.new("L", (32, 32), 255).save(f"{src}/tile/ground_truth/hole/000_mask.png")  # the image is 64x64
    assert ingest_job.main([src, "--archive", plant["arch"], "--deployment", "an", "--date", "2026-11-24"]) == 0
    assert evaluate_job.main(["--deployment", "an", "--archive", plant["arch"], "--model-alias", "production"]) == 1
    err = capsys.readouterr().err
    assert "could not be used" in err and "tile/test/hole/000: mask shape (32, 32) differs from image (64, 64)" in err
    assert registry.evaluation_of(registry.get_version("an", alias="production")) is None


JPEGS = "2026-11-24"


def _jpeg_night(arch):
    """A night as a plant's cameras write it (JPEG, some rotated by EXIF) with what else arrives: a PNG, a CMYK
    JPEG, a truncated JPEG, bytes that are no image."""
    import datetime as dt
    import io

    import numpy as np
    from PIL import Image

    from pipeline.sources import archive
    from pipeline.sources.synthetic import add_defect, normal_image

    rng = np.random.default_rng(3)

    def enc(a, fmt="JPEG", orientation=None, mode=None):
        im = Image.fromarray(a) if mode is None else Image.fromarray(a).convert(mode)
        buf, kw = io.BytesIO(), {"quality": 92} if fmt == "JPEG" else {}
        if orientation:
            exif = im.getexif()
            exif[0x0112] = orientation
            kw["exif"] = exif
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rows = {}
    for k in range(6):  # larger than the model's input (64): both paths resize, each its own way
        p = ("tile", "washer")[k % 2]
        img = normal_image(p, 160, rng)
        if k % 3 == 2:
            img, _ = add_defect(img, "scratch", rng)
        rows[f"{p}/jpeg-{k}"] = (p, enc(img, orientation=(None, 6, 3)[k % 3]))
    img = normal_image("tile", 160, rng)
    rows.update({"tile/png": ("tile", enc(img, "PNG")), "tile/cmyk": ("tile", enc(img, mode="CMYK")),
                 "tile/truncated": ("tile", enc(img)[:400]), "washer/not-an-image": ("washer", b"GIF89a nothing")})
    w = archive.ShardWriter(arch, "an", JPEGS)
    for image_id, (p, data) in rows.items():
        w.write({"image_id": image_id, "product": p, "captured_at": dt.datetime(2026, 11, 24, tzinfo=dt.timezone.utc),
                 "image": data, "split": "test", "label": None, "mask": None, "defect": None, "source_uri": None})
    w.close()
    return sorted(rows)


def test_jpegs_decoded_on_the_scoring_actor_score_as_the_cpu_tasks_decode_them(plant):
    """--decode device (nvJPEG on a GPU; the same code on libjpeg here): every row once, the same statuses as
    the CPU tasks' decode, scores within the resampling difference, heatmaps written."""
    from pipeline.nightly.run import ScoreOptions, score_night

    ids = _jpeg_night(plant["arch"])
    nights_ = {}
    # auto, the default, decodes in the CPU tasks where the actors hold no GPU (here): logged as what it chose
    for decode, chosen in (("cpu", "cpu"), ("device", "device"), ("auto", "cpu")):
        out = os.path.join(plant["root"], f"out-{decode}")
        s = score_night(archive.Partition(plant["arch"], "an", JPEGS), out, ScoreOptions(decode=decode, max_error_rate=0.5))
        assert registry.client().get_run(s["run_id"]).data.params["decode"] == chosen
        fs, path = storage.arrow_filesystem(nights.Night(out, "an", JPEGS).uri)
        t = pads.dataset(path, filesystem=fs, format="parquet").to_table(
            columns=["image_id", "score", "status", "error", "height", "width", "heatmap_uri"]).to_pylist()
        nights_[decode] = {r["image_id"]: r for r in t}
        assert sorted(nights_[decode]) == ids and s["rows_out"] == len(ids)
    cpu, dev = nights_["cpu"], nights_["device"]
    auto = nights_["auto"]  # the CPU tasks' pixels, so their scores to the bit
    assert {i: r["status"] for i, r in auto.items()} == {i: r["status"] for i, r in cpu.items()}
    assert all(auto[i]["score"] == cpu[i]["score"] for i in ids if cpu[i]["status"] == "ok")
    for i in ids:
        assert (dev[i]["status"], dev[i]["height"], dev[i]["width"]) == (cpu[i]["status"], cpu[i]["height"],
                                                                           cpu[i]["width"]), i
        assert dev[i]["error"].split(" at 0x")[0] == cpu[i]["error"].split(" at 0x")[0], i
    ok = [i for i in ids if cpu[i]["status"] == "ok"]
    assert sorted(set(ids) - set(ok)) == ["tile/truncated", "washer/not-an-image"]
    for i in ok:  # resampled a little differently (full decode + torch's antialiased bicubic vs PIL's draft)
        assert abs(dev[i]["score"] - cpu[i]["score"]) <= 0.05 * abs(cpu[i]["score"]) + 1e-6, (i, dev[i], cpu[i])
        assert storage.exists(dev[i]["heatmap_uri"])
    # the JPEGs took the other path (their pixels differ a little), the PNG and the CMYK JPEG the same one
    assert all(dev[i]["score"] != cpu[i]["score"] for i in ok if "/jpeg-" in i)
    assert dev["tile/png"]["score"] == cpu["tile/png"]["score"] and dev["tile/cmyk"]["score"] == cpu["tile/cmyk"]["score"]


def test_a_night_in_which_no_row_scored_publishes_its_error_rows_and_exits_1(plant, tmp_path, capsys):
    """Every row an unknown product or undecodable: the honest error rows are published, and the scheduler sees
    exit 1 with no_row_scored in --json (issue 23)."""
    import json

    from PIL import Image
    date = "2026-11-28"
    src = tmp_path / "gear"
    src.mkdir()
    Image.new("RGB", (32, 32), (90, 90, 90)).save(src / "g1.png")
    (src / "g2.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    assert ingest_job.main([str(src), "--archive", plant["arch"], "--deployment", "an", "--date", date,
                            "--product", "gear"]) == 0
    capsys.readouterr()
    assert score_job.main(["--deployment", "an", "--archive", plant["arch"], "--date", date, "--output", plant["out"],
                           "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["exit_code"] == 1 and out["no_row_scored"] and out["published"] and out["ok"] == 0
    assert any("no row of the night scored" in f for f in out["failed"])
    assert [r[4] for r in _night(plant["out"], date)] == ["error", "error"]


def test_a_report_that_fails_after_the_publish_exits_1(plant, monkeypatch, capsys):
    """The night stands (readers see it), but the scheduler is told: exit 1, report_error in --json."""
    import json

    from pipeline.nightly import report

    def broken(night, top_n=0, operating_points=None, lineage=""):
        raise OSError("the report's store refused the write")
    monkeypatch.setattr(report, "write", broken)
    capsys.readouterr()
    assert score_job.main(["--deployment", "an", "--archive", plant["arch"], "--date", SMALL, "--output",
                           plant["out"], "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["published"] and "store refused the write" in out["report_error"] and not out["no_row_scored"]
    assert nights.Night(plant["out"], "an", SMALL).published()["run_id"] == out["run_id"]



def test_a_drift_test_that_fails_after_the_publish_exits_1(plant, monkeypatch, capsys):
    """As a failed report: the night stands, exit 1, drift_error in --json (never a silent 'no drift')."""
    import json

    from pipeline.nightly import drift

    def broken(night, model_version, files):
        raise OSError("the distributions' store refused the write")
    monkeypatch.setattr(drift, "assess", broken)
    capsys.readouterr()
    assert score_job.main(["--deployment", "an", "--archive", plant["arch"], "--date", SMALL, "--output",
                           plant["out"], "--json", "--fail-on-drift"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["published"] and "refused the write" in out["drift_error"] and out["drift"] is None
    assert nights.Night(plant["out"], "an", SMALL).published()["run_id"] == out["run_id"]
