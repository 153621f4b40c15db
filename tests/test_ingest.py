import numpy as np
import pytest
from PIL import Image

from jobs import ingest as ingest_job
from pipeline import archive
from pipeline.images import decode_mask
from pipeline.ingest import ingest


def test_mvtec_layout_becomes_partitioned_shards(synthetic_src, tmp_path):
    arch = str(tmp_path / "archive")
    rep = ingest(synthetic_src, arch, "line1", "2026-11-21", rows_per_shard=10)
    # 3 products x (4 train + 3 good + 3 defect types x 1)
    assert rep.rows == 30 and rep.layout == "mvtec" and len(rep.shards) == 3  # one 10-row shard per product
    assert all("deployment=line1/date=2026-11-21/part-" in s for s in rep.shards)
    t = archive.read_table(arch, "line1", "2026-11-21").to_pylist()
    assert len({r["image_id"] for r in t}) == 30
    train = [r for r in t if r["split"] == "train"]
    assert len(train) == 12 and all(r["label"] == 0 and r["mask"] is None for r in train)
    bad = [r for r in t if r["label"] == 1]
    assert len(bad) == 9 and all(r["mask"] is not None for r in bad)
    r = bad[0]
    src_mask = np.asarray(Image.open(f"{synthetic_src}/{r['product']}/ground_truth/{r['defect']}/"
                                     f"{r['image_id'].rsplit('/', 1)[1]}_mask.png")) > 0
    assert (decode_mask(r["mask"]) == src_mask).all()
    assert all(r["source_uri"] and r["captured_at"] is not None for r in t)
    # a rerun replaces the partition, it never duplicates rows
    ingest(synthetic_src, arch, "line1", "2026-11-21", rows_per_shard=10)
    assert archive.read_table(arch, "line1", "2026-11-21").num_rows == 30


def test_flat_folder_needs_a_product_and_keeps_undecodable_images(tmp_path, capsys):
    src = tmp_path / "flat"
    (src / "cam2").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "a.png")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(src / "cam2" / "b.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (src / "notes.txt").write_text("not an image")
    arch = str(tmp_path / "archive")
    assert ingest_job.main([str(src), "--archive", arch, "--deployment", "d", "--date", "2026-01-02"]) == 2
    assert "pass --product" in capsys.readouterr().err
    assert ingest_job.main([str(src), "--archive", arch, "--deployment", "d", "--date", "2026-01-02",
                            "--product", "screw"]) == 0
    assert "1 image(s) do not decode" in capsys.readouterr().err
    t = archive.read_table(arch, "d", "2026-01-02")
    assert sorted(t["image_id"].to_pylist()) == ["screw/a", "screw/broken", "screw/cam2/b"]
    assert set(t["split"].to_pylist()) == {"test"} and set(t["label"].to_pylist()) == {None}
    # another product into the same night adds to it; re-ingesting the first replaces only its rows
    assert ingest_job.main([str(src / "cam2"), "--archive", arch, "--deployment", "d", "--date", "2026-01-02",
                            "--product", "gear"]) == 0
    assert ingest_job.main([str(src), "--archive", arch, "--deployment", "d", "--date", "2026-01-02",
                            "--product", "screw"]) == 0
    assert sorted(archive.read_table(arch, "d", "2026-01-02")["image_id"].to_pylist()) == [
        "gear/b", "screw/a", "screw/broken", "screw/cam2/b"]


def test_ingest_from_s3_prefix(bucket, tmp_path):
    import io

    import boto3
    s3 = boto3.client("s3")
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(buf, format="PNG")
        s3.put_object(Bucket=bucket, Key=f"incoming/pill/{i}.png", Body=buf.getvalue())
    arch = f"s3://{bucket}/archive-ingest"
    rep = ingest(f"s3://{bucket}/incoming/pill", arch, "plant", "2026-11-22", product="pill")
    assert rep.rows == 3 and rep.shards[0].startswith("s3://")
    t = archive.read_table(arch, "plant", "2026-11-22")
    assert t["source_uri"].to_pylist()[0].startswith(f"s3://{bucket}/incoming/pill/")


@pytest.mark.parametrize("date", ["2026-13-01", "20261122", ""])
def test_bad_dates_are_refused(tmp_path, synthetic_src, date):
    with pytest.raises(ValueError):
        ingest(synthetic_src, str(tmp_path), "line1", date)
