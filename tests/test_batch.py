"""The scoring actors' rows and the heatmap writer stage of nightly scoring (the CPU task after the actors)."""
import os

import numpy as np
from PIL import Image

from pipeline.nightly.score_table import RunInfo, score_rows
from pipeline.nightly.stages import HeatmapTarget, write_heatmaps
from pipeline.sources.images import decode_heatmap

INFO = RunInfo("d", "anople-d", "1", "run")


def _scored_batch(n=3):
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 0.4, size=(n, 16, 16)).astype(np.float32)
    batch = {"image_id": np.array([f"img/{i}" for i in range(n)], dtype=object),
             "product": np.array(["tile"] * n, dtype=object)}
    status, error = ["ok"] * n, [""] * n
    status[1], error[1] = "error", "image does not decode"
    score = maps.reshape(n, -1).max(1).astype(np.float64)
    score[1] = np.nan
    out = score_rows(batch, INFO, score=score, threshold=np.full(n, 0.1), status=status, error=error)
    out.update(map=maps, height=np.array([40, 40, 40]), width=np.array([30, 30, 30]))
    return out, maps


def test_score_rows_stamp_the_run_and_never_call_an_error_anomalous():
    out, _ = _scored_batch()
    assert list(out["model_name"]) == ["anople-d"] * 3 and set(out["run_id"]) == {"run"}
    assert out["is_anomalous"].tolist() == [out["score"][0] > 0.1, False, out["score"][2] > 0.1]
    assert all(u is None for u in out["heatmap_uri"]) and np.isnan(out["heatmap_scale"]).all()


def test_writes_a_16bit_png_per_scored_row_at_the_image_resolution(tmp_path):
    target = HeatmapTarget(str(tmp_path / "run=r1"))
    batch, maps = _scored_batch()
    out = write_heatmaps(batch, target)
    assert "map" not in out  # the map does not reach the score table; the source size does
    assert list(out["height"]) == [40, 40, 40] and list(out["width"]) == [30, 30, 30]
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert out["heatmap_uri"][1] is None and np.isnan(out["heatmap_scale"][1])
    for i in (0, 2):
        uri = out["heatmap_uri"][i]
        assert uri == str(tmp_path / "run=r1" / f"img%2F{i}.png")
        with Image.open(uri) as im:
            assert im.size == (30, 40) and im.mode.startswith("I")
        assert out["heatmap_scale"][i] == 0.4  # the product's fixed scale: 4 x its threshold 0.1
        back = decode_heatmap(open(uri, "rb").read(), out["heatmap_scale"][i])
        assert abs(back.max() - maps[i].max()) < 0.05  # bilinear resize keeps the peak near
    assert out["is_anomalous"][0] == (out["score"][0] > 0.1) and not out["is_anomalous"][1]


def test_a_bounded_side_stores_small_maps_that_decode_to_the_image_size(tmp_path):
    batch, maps = _scored_batch()
    batch.update(height=np.array([400, 400, 400]), width=np.array([300, 300, 300]))
    out = write_heatmaps(batch, HeatmapTarget(str(tmp_path / "run=r1"), side=20))
    with Image.open(out["heatmap_uri"][0]) as im:
        assert im.size == (15, 20)
    back = decode_heatmap(open(out["heatmap_uri"][0], "rb").read(), size=(out["height"][0], out["width"][0]))
    assert back.shape == (400, 300)


def test_a_failed_write_becomes_an_error_row_not_a_failed_batch(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    batch, _ = _scored_batch()
    out = write_heatmaps(batch, HeatmapTarget(str(blocker / "run=r1")))
    assert list(out["status"]) == ["error"] * 3
    assert np.isnan(out["score"]).all()  # an error row carries no score, also when only its heatmap failed
    assert out["error"][0].startswith("heatmap write failed") and out["error"][1] == "image does not decode"
    assert not out["is_anomalous"].any() and all(u is None for u in out["heatmap_uri"])
    assert not os.path.isdir(blocker)


def test_the_footer_reader_pool_is_sized_to_the_shards_and_an_operators_setting_wins(monkeypatch):
    """Ray Data reads parquet footers on 32 new actor processes per read by default; a night of a few shards
    gets one (50 shards a reader, at most 32), for the read only; an operator's own setting is kept."""
    from pipeline.nightly.stages import FOOTER_ENV, footer_readers

    monkeypatch.delenv(FOOTER_ENV, raising=False)
    for n, want in ((1, "1"), (50, "1"), (51, "2"), (10_000, "32")):
        with footer_readers(n):
            assert os.environ[FOOTER_ENV] == want
        assert FOOTER_ENV not in os.environ
    monkeypatch.setenv(FOOTER_ENV, "7")
    with footer_readers(3):
        assert os.environ[FOOTER_ENV] == "7"
    assert os.environ[FOOTER_ENV] == "7"


def test_decoded_rows_come_in_blocks_of_a_few_actor_batches_not_of_rays_128_mb(ray_local, tmp_path):
    """Ray Data fills a task's output block up to 128 MB before handing it on: every decode worker held ~28
    decoded batches (at 224 px) and the actors waited for them. Decoded blocks are now a couple of batches;
    every row still arrives once, and the driver's Ray Data settings are left as they were."""
    import datetime as dt
    import io

    import ray.data

    from pipeline.nightly.stages import DECODED_BATCHES_PER_BLOCK, decoded_rows
    from pipeline.sources import archive

    buf = io.BytesIO()
    Image.fromarray(np.full((48, 40, 3), 128, np.uint8)).save(buf, format="JPEG")
    w = archive.ShardWriter(str(tmp_path / "archive"), "d", "2026-11-22")
    for i in range(60):
        w.write({"image_id": f"p/{i:03d}", "product": "p", "captured_at": dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc),
                 "image": buf.getvalue(), "split": "test", "label": None, "mask": None, "defect": None,
                 "source_uri": None})
    w.close()
    before = ray.data.DataContext.get_current().target_max_block_size
    from pipeline.sources.archive import Partition
    ds = decoded_rows(Partition(str(tmp_path / "archive"), "d", "2026-11-22"), ["p"], image_size=32, batch_size=4)
    assert ray.data.DataContext.get_current().target_max_block_size == before
    sizes = [b.num_rows() for b in ds.iter_internal_ref_bundles()]
    # a block closes once it is over its target: one batch past DECODED_BATCHES_PER_BLOCK batches at most
    assert DECODED_BATCHES_PER_BLOCK <= 4 and sum(sizes) == 60 and max(sizes) <= 4 * 5, sizes


def test_more_gpu_actors_than_gpus_share_them_so_that_all_of_them_start():
    from pipeline.nightly.stages import gpus_per_actor
    assert gpus_per_actor(1, 1) == 1.0 and gpus_per_actor(4, 1) == 1.0  # never more than one GPU an actor
    assert gpus_per_actor(1, 2) == 0.5 and gpus_per_actor(2, 3) == 2 / 3
    assert gpus_per_actor(1, 0) == 1.0  # no pool smaller than one actor
