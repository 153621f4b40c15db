import numpy as np
import pytest
from PIL import Image

from jobs import ingest as ingest_job
from pipeline.sources import archive
from pipeline.sources.images import decode_mask
from pipeline.sources.ingest import ingest


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


def _img(path, value=100, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def test_visa_layout_from_its_split_csv(tmp_path):
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for i in range(2):
        _img(root / f"candle/Data/Images/Normal/{i:04d}.JPG")
        rows.append(f"candle,train,normal,candle/Data/Images/Normal/{i:04d}.JPG,")
    _img(root / "candle/Data/Images/Anomaly/0100.JPG")
    m = np.zeros((32, 32), np.uint8)
    m[3:9, 3:9] = 255
    (root / "candle/Data/Masks/Anomaly").mkdir(parents=True)
    Image.fromarray(m).save(root / "candle/Data/Masks/Anomaly/0100.png")
    rows.append("candle,test,anomaly,candle/Data/Images/Anomaly/0100.JPG,candle/Data/Masks/Anomaly/0100.png")
    (root / "split_csv").mkdir()
    (root / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")
    rep = ingest(str(root), str(tmp_path / "a"), "v", "2026-01-01")
    assert rep.layout == "visa" and rep.rows == 3
    t = archive.read_table(str(tmp_path / "a"), "v", "2026-01-01").to_pylist()
    bad = [r for r in t if r["label"] == 1]
    assert len(bad) == 1 and decode_mask(bad[0]["mask"]).sum() == 36
    assert sorted(r["split"] for r in t) == ["test", "train", "train"]


def test_realiad_layout_from_its_jsons(tmp_path):
    import json
    root = tmp_path / "realiad"
    _img(root / "realiad_256/audiojack/S0001/OK/a_C1.jpg")
    _img(root / "realiad_256/audiojack/S0002/NG/HS/b_C1.jpg")
    m = np.zeros((32, 32), np.uint8)
    m[0:4, 0:4] = 255
    Image.fromarray(m).save(root / "realiad_256/audiojack/S0002/NG/HS/b_C1.png")
    doc = {"meta": {"prefix": "audiojack", "normal_class": "OK"},
           "train": [{"category": "audiojack", "anomaly_class": "OK", "image_path": "S0001/OK/a_C1.jpg", "mask_path": None}],
           "test": [{"category": "audiojack", "anomaly_class": "HS", "image_path": "S0002/NG/HS/b_C1.jpg",
                     "mask_path": "S0002/NG/HS/b_C1.png"}]}
    (root / "realiad_jsons").mkdir(parents=True)
    (root / "realiad_jsons/audiojack.json").write_text(json.dumps(doc))
    rep = ingest(str(root), str(tmp_path / "a"), "r", "2026-01-01")
    assert rep.layout == "realiad" and rep.rows == 2
    t = {r["split"]: r for r in archive.read_table(str(tmp_path / "a"), "r", "2026-01-01").to_pylist()}
    assert t["train"]["label"] == 0 and t["test"]["label"] == 1 and t["test"]["defect"] == "HS"
    assert decode_mask(t["test"]["mask"]).sum() == 16


def _flat(tmp_path, name, n, ext="png", value=50):
    src = tmp_path / name
    src.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), value + i, np.uint8)).save(src / f"{i}.{ext}")
    return str(src)


def _ids(arch, date="2026-01-03"):
    return sorted(archive.read_table(arch, "d", date)["image_id"].to_pylist())


def test_a_product_never_touches_another_whose_name_it_prefixes(tmp_path):
    arch = str(tmp_path / "archive")
    assert ingest_job.main([_flat(tmp_path, "a", 2), "--archive", arch, "--deployment", "d", "--date", "2026-01-03",
                            "--product", "tile-2"]) == 0
    assert ingest_job.main([_flat(tmp_path, "b", 3), "--archive", arch, "--deployment", "d", "--date", "2026-01-03",
                            "--product", "tile"]) == 0
    assert _ids(arch) == ["tile-2/0", "tile-2/1", "tile/0", "tile/1", "tile/2"]
    # and re-ingesting tile replaces exactly tile's rows
    assert ingest_job.main([_flat(tmp_path, "c", 1), "--archive", arch, "--deployment", "d", "--date", "2026-01-03",
                            "--product", "tile"]) == 0
    assert _ids(arch) == ["tile-2/0", "tile-2/1", "tile/0"]


def test_a_failed_ingest_changes_nothing(tmp_path, capsys):
    arch = str(tmp_path / "archive")
    assert ingest_job.main([_flat(tmp_path, "a", 3), "--archive", arch, "--deployment", "d", "--date", "2026-01-03",
                            "--product", "tile"]) == 0
    before = sorted(p.name for p in (tmp_path / "archive" / "deployment=d" / "date=2026-01-03").iterdir())
    bad = _flat(tmp_path, "bad", 3, value=90)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f"{bad}/1.jpg")  # 1.png and 1.jpg: one image_id
    assert ingest_job.main([bad, "--archive", arch, "--deployment", "d", "--date", "2026-01-03",
                            "--product", "tile", "--rows-per-shard", "1"]) == 2  # shards were written, then undone
    assert "two source files map to image_id 'tile/1'" in capsys.readouterr().err
    assert _ids(arch) == ["tile/0", "tile/1", "tile/2"]
    assert sorted(p.name for p in (tmp_path / "archive" / "deployment=d" / "date=2026-01-03").iterdir()) == before


def test_shards_of_older_ingests_are_replaced_by_exact_product(tmp_path):
    """Shards named before write ids existed (part-<product>-NNNNN.parquet) still belong to their product."""
    import pyarrow.parquet as pq

    from pipeline.sources.archive import shard_product

    assert [shard_product(n) for n in ("part-tile-00000.parquet", "part-tile-2-00003.parquet",
                                       "part-tile-2-w0123456789ab-00000.parquet", "part-a%2Fb-00001.parquet",
                                       "notes.txt", "part--00000.parquet")] == ["tile", "tile-2", "tile-2", "a/b", None, None]
    arch = str(tmp_path / "archive")
    assert ingest_job.main([_flat(tmp_path, "a", 2), "--archive", arch, "--deployment", "d", "--date", "2026-01-03",
                            "--product", "tile"]) == 0
    part = tmp_path / "archive" / "deployment=d" / "date=2026-01-03"
    (new,) = part.iterdir()
    new.rename(part / "part-tile-00000.parquet")  # as an older ingest named it
    pq.write_table(pq.read_table(part / "part-tile-00000.parquet").slice(0, 1), part / "part-tile-2-00000.parquet")
    assert ingest_job.main([_flat(tmp_path, "b", 1), "--archive", arch, "--deployment", "d", "--date", "2026-01-03",
                            "--product", "tile"]) == 0
    assert sorted(p.name for p in part.iterdir())[0] == "part-tile-2-00000.parquet" and len(list(part.iterdir())) == 2


def test_every_source_file_is_archived_or_skipped_with_its_reason(tmp_path, capsys):
    src = tmp_path / "mixed"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "a.png")
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "c.webp")
    (src / "notes.txt").write_text("shift log")
    (src / "raw.dng").write_bytes(b"raw sensor data")
    arch = str(tmp_path / "archive")
    assert ingest_job.main([str(src), "--archive", arch, "--deployment", "d", "--date", "2026-01-03",
                            "--product", "cam"]) == 0
    out = capsys.readouterr()
    assert "3 images" in out.out and "2 skipped" in out.out
    assert "notes.txt: not an image file (extension '.txt'" in out.err and "raw.dng: not an image file" in out.err
    assert _ids(arch) == ["cam/a", "cam/anim", "cam/c"]


def test_product_names_are_validated_like_deployments(tmp_path):
    from pipeline.errors import UsageError
    with pytest.raises(UsageError, match="product name"):
        ingest(_flat(tmp_path, "a", 1), str(tmp_path / "archive"), "d", "2026-01-03", product="../escape")
