"""Metrics against independent references: scikit-learn for AUROC, a brute-force AUPRO."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from pipeline.evaluation.metrics import PixelMetrics, auroc, f1_max

BINS = 1024


def _grid_scores(rng, shape):
    """Scores exactly on the metric's bin grid ((k + 0.5) / 1024 is exact in binary floating point)."""
    return (rng.integers(0, BINS, shape) + 0.5) / BINS


def brute_force_aupro(maps, masks, limit=0.3):
    """Threshold by threshold over every distinct score: FPR over normal pixels, mean overlap per
    connected ground-truth region; trapezoid to FPR `limit` (interpolated), normalised by `limit`."""
    scores = np.concatenate([m.ravel() for m in maps])
    regions = []
    for m, g in zip(maps, masks):
        lab, n = ndimage.label(g)
        regions += [m[lab == r] for r in range(1, n + 1)]
    normal = np.concatenate([m[~g] for m, g in zip(maps, masks)])
    fprs, pros = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        fprs.append((normal >= t).mean())
        pros.append(np.mean([(r >= t).mean() for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    x, y = list(fprs[keep]), list(pros[keep])
    if x[-1] < limit:
        j = keep.sum()
        t = (limit - fprs[j - 1]) / (fprs[j] - fprs[j - 1])
        x.append(limit)
        y.append(pros[j - 1] + t * (pros[j] - pros[j - 1]))
    return np.trapezoid(y, x) / limit


def test_image_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = rng.integers(0, 10, 50) / 10
        y = rng.random(50) < 0.4
        assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_hand_made():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert np.isnan(auroc([0.1, 0.2], [0, 0]))


def test_f1_max_matches_sklearn():
    rng = np.random.default_rng(2)
    s, y = rng.random(200), rng.random(200) < 0.3
    p, r, _ = precision_recall_curve(y, s)
    ref = np.max(2 * p * r / np.maximum(p + r, 1e-12))
    assert f1_max(s, y) == pytest.approx(ref, abs=1e-12)


def test_streaming_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(3)
    pm = PixelMetrics(bins=BINS)
    maps, masks = [], []
    for _ in range(5):
        g = np.zeros((24, 24), bool)
        g[rng.integers(0, 12):][:, rng.integers(0, 12):][:6, :6] = True
        a = _grid_scores(rng, (24, 24))
        a[g] = np.minimum(a[g] + 64 / BINS, (BINS - 0.5) / BINS)
        pm.update(a, g)
        maps.append(a)
        masks.append(g)
    ref = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert pm.compute()["pixel_auroc"] == pytest.approx(ref, abs=1e-12)


def test_streaming_aupro_matches_brute_force():
    rng = np.random.default_rng(4)
    pm = PixelMetrics(bins=BINS)
    maps, masks = [], []
    for k in range(4):
        g = np.zeros((20, 20), bool)
        g[2:6, 2:9] = True          # a big region
        g[14:16, 14:16] = k % 2 == 0  # and sometimes a small one: each region counts once
        a = _grid_scores(rng, (20, 20))
        a[g] = np.minimum(a[g] + 200 / BINS, (BINS - 0.5) / BINS)
        pm.update(a, g)
        maps.append(a)
        masks.append(g)
    assert pm.compute()["aupro"] == pytest.approx(brute_force_aupro(maps, masks), abs=1e-9)


def test_aupro_hand_made_perfect_and_inverted():
    g = np.zeros((10, 10), bool)
    g[:3, :3] = True
    perfect = PixelMetrics(bins=BINS)
    perfect.update(np.where(g, 0.9, 0.1), g)
    assert perfect.compute()["aupro"] == pytest.approx(1.0)
    assert perfect.compute()["pixel_auroc"] == pytest.approx(1.0)
    inverted = PixelMetrics(bins=BINS)
    inverted.update(np.where(g, 0.1, 0.9), g)
    assert inverted.compute()["aupro"] == pytest.approx(0.0)


def _state_bytes(obj) -> int:
    """Bytes an object's state holds: arrays by size, containers by length (a list of maps would grow)."""
    total = 0
    for v in vars(obj).values():
        if isinstance(v, np.ndarray):
            total += v.nbytes
        elif isinstance(v, (list, tuple, dict, set)):
            total += 8 * len(v) + sum(getattr(x, "nbytes", 0) for x in (v.values() if isinstance(v, dict) else v))
    return total


def test_pixel_metrics_state_does_not_grow_with_images_or_their_size():
    rng = np.random.default_rng(5)
    small, big = PixelMetrics(bins=BINS), PixelMetrics(bins=BINS)
    small.update(rng.random((8, 8)), np.eye(8, dtype=bool))
    for _ in range(30):
        big.update(rng.random((128, 128)), rng.random((128, 128)) > 0.9)
    assert _state_bytes(big) == _state_bytes(small) <= 4 * 8 * BINS
    assert big.compute()["pixel_auroc"] == pytest.approx(0.5, abs=0.02)  # random maps: chance, but counted


def test_curves_for_figures_match_sklearn_and_end_at_the_corners():
    from sklearn.metrics import roc_curve

    from pipeline.evaluation.metrics import ProductMetrics, image_roc
    rng = np.random.default_rng(5)
    s, y = rng.normal(size=60).round(1), rng.integers(0, 2, 60)
    fpr, tpr = image_roc(s, y)
    ref_fpr, ref_tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert np.allclose(fpr, ref_fpr) and np.allclose(tpr, ref_tpr)  # ties step together, as sklearn's
    m = ProductMetrics()
    for i in range(6):
        g = np.zeros((16, 16), bool)
        g[4:9, 4:9] = i % 2 == 1
        a = _grid_scores(rng, (16, 16))
        m.update(float(a.max()), int(g.any()), a, g)
    c = m.curves()
    x, t = c["pixel_roc"]
    assert (x[0], t[0], x[-1], t[-1]) == (0.0, 0.0, 1.0, 1.0) and len(x) <= 514
    assert np.trapezoid(t, x) == pytest.approx(m.compute()["pixel_auroc"], abs=0.01)  # thinned, same area
    assert set(c) == {"image_roc", "pixel_roc", "pro"}
