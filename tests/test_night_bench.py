"""The archive-scale benchmark's arithmetic on scored_at stamps (the benchmark itself asserts nothing)."""
import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.bench.night_bench import steady_state


def _scores(path, stamps):
    t0 = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)
    pq.write_table(pa.table({"scored_at": pa.array([t0 + dt.timedelta(seconds=float(s)) for s in stamps],
                                                   pa.timestamp("us", tz="UTC")),
                             "status": ["ok"] * len(stamps)}), path)
    return t0.timestamp()


def test_a_night_that_slows_down_shows_it_in_its_tenths(tmp_path):
    flat = np.arange(1000) / 10.0  # 10 images/s throughout, first row 5 s after the job started
    start = _scores(tmp_path / "flat.parquet", flat + 5)
    r = steady_state(str(tmp_path / "flat.parquet"), start)
    assert abs(r["startup_s"] - 5) < 1e-3 and abs(r["steady_images_per_s"] - 10) < 0.1
    assert np.allclose(r["rate_by_tenth"], 10, rtol=0.02)
    slowing = np.concatenate([flat[:500], flat[499] + np.arange(1, 501) / 5.0])  # 10/s for 50 s, then 5/s for 100 s
    r = steady_state(str(tmp_path / "slow.parquet"), _scores(tmp_path / "slow.parquet", slowing))
    assert np.allclose(r["rate_by_tenth"][:3], 10, rtol=0.03) and np.allclose(r["rate_by_tenth"][4:], 5, rtol=0.03)


def test_batches_share_a_stamp_and_a_night_of_few_batches_has_no_tenths(tmp_path):
    batched = np.repeat(np.arange(40) * 3.2, 32)  # 40 batches of 32 rows, one every 3.2 s: 10 images/s
    r = steady_state(str(tmp_path / "b.parquet"), _scores(tmp_path / "b.parquet", batched))
    assert np.allclose(r["rate_by_tenth"], 10, rtol=0.3) and abs(np.mean(r["rate_by_tenth"]) - 10) < 0.5
    few = np.repeat(np.arange(7) * 3.2, 32)
    assert steady_state(str(tmp_path / "f.parquet"), _scores(tmp_path / "f.parquet", few))["rate_by_tenth"] is None


def test_cores_busy_are_the_change_of_cpu_seconds_over_the_steady_window():
    from jobs.bench.night_bench import cores_used

    # an actor burning 2 cores and a decode worker 0.5 from t=10 s; a process that started later counts from 0
    samples = [(t, {"ray::ScoreActor": 2.0 * t, "ray::MapBatches(decode_batch)": 0.5 * t,
                    **({"late": 0.25 * (t - 50)} if t >= 50 else {})}) for t in np.arange(0, 100, 0.5)]
    busy = cores_used(samples, 60.0, 90.0)
    assert np.isclose(busy["ray::ScoreActor"], 2.0) and np.isclose(busy["ray::MapBatches(decode_batch)"], 0.5)
    assert np.isclose(busy["late"], 0.25) and cores_used(samples[:1], 0, 1) == {}


def test_each_process_of_the_tree_is_named_and_charged_the_cpu_it_used_between_samples(tmp_path):
    import subprocess
    import sys
    import time

    from jobs.bench.night_bench import tree_memory_mb
    (tmp_path / "spin.py").write_text("import time\nt = time.time()\nwhile time.time() - t < 3: pass\n")
    spin = subprocess.Popen([sys.executable, str(tmp_path / "spin.py")])
    try:
        time.sleep(0.5)
        cpu: dict = {"pids": {}, "by_name": {}}
        assert tree_memory_mb(spin.pid, cpu)["tree"] > 0
        first = cpu["by_name"]["spin.py"]
        time.sleep(1.0)
        tree_memory_mb(spin.pid, cpu)
        assert 0.2 < cpu["by_name"]["spin.py"] - first < 1.5  # at most one core for the second between the samples
    finally:
        spin.kill()


def test_the_rows_of_the_batch_that_opens_the_steady_window_are_not_counted_in_it(tmp_path):
    # 7 batches of 32 rows, one every 3.2 s (10 images/s). The 10th percentile stamp is batch 0's: its rows were
    # done when the window opened, so counting them would claim 192 rows in 5 intervals (12 images/s)
    short = np.repeat(np.arange(7) * 3.2, 32)[:200]
    r = steady_state(str(tmp_path / "s.parquet"), _scores(tmp_path / "s.parquet", short))
    assert abs(r["steady_images_per_s"] - 10) < 0.05, r["steady_images_per_s"]


def test_gpu_use_is_averaged_over_each_nights_steady_window_and_broken_lines_are_skipped(tmp_path):
    from jobs.bench.night_bench import gpu_in_windows
    log = tmp_path / "gpu.csv"
    log.write_text("10.0,50,100\n10.5,70,200\n11.0,90,300\nNo devices were found\n12.5,7\n20.0,1,1\n")
    use = gpu_in_windows(str(log), [("night", (10.2, 11.0)), ("later", (30.0, 40.0))])
    assert use == {"night": (80.0, 250.0, 2)}  # a window without samples is left out, not reported as 0 %


def test_the_in_process_profile_times_every_stage_of_the_night_through_the_real_code(tmp_path):
    from jobs.bench.night_bench import actor_profile
    prof = actor_profile("anople-tiny-vit", "random", 96, 2, batch=4, batches=2, workdir=str(tmp_path))
    stages = prof["per_image_s"]
    assert set(stages) == {"decode (CPU task)", "header check (CPU task, --decode device)", "bare visual forward",
                           "Scorer.score", "actor call (decoded batch)", "actor call (--decode device)",
                           "heatmap writer (CPU task)"}
    assert all(np.isfinite(v) and v > 0 for v in stages.values()) and prof["images"] == 8
    assert len(list(tmp_path.rglob("*.png"))) == 8  # the writer really wrote each scored row's heatmap
