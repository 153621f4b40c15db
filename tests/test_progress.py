"""Progress lines of long jobs: rate and ETA at most every N seconds, and a last line at the end."""
import io

from pipeline.progress import Progress, duration, epoch_line


def test_lines_come_at_the_interval_with_rate_and_eta():
    now = [0.0]
    out = io.StringIO()
    p = Progress("score d 2026-11-22", 1000, every=30, out=out, clock=lambda: now[0])
    for _ in range(10):  # 100 rows every 10 s
        now[0] += 10
        p.update(100)
    p.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # at 30, 60, 90 s, and the end
    assert lines[0] == "score d 2026-11-22: 300/1,000 rows (30.0%), 10.0 rows/s, elapsed 30s, ETA 1m10s"
    assert lines[-1] == "score d 2026-11-22: 1,000/1,000 rows (100.0%), 10.0 rows/s, elapsed 1m40s"
    out = io.StringIO()
    p = Progress("score", 10, every=30, out=out, clock=lambda: now[0])
    now[0] += 31
    p.update(10)
    p.finish()
    assert len(out.getvalue().splitlines()) == 1  # the last update already said it all: not twice


def test_epoch_line_names_the_validation_and_an_upper_bound_eta():
    line = epoch_line({"epoch": 3, "loss_total": 1.23456, "val_fused_pixel_auroc": 0.912, "val_best_epoch": 2},
                      12, [10.0, 12.0, 11.0])
    assert line == ("train: epoch 3/12, loss 1.2346, val fused P-AUROC 91.2 (best epoch 2), 11.0 s/epoch, "
                    "ETA 1m39s at most")
    assert duration(3725) == "1h02m"
