"""Anomaly-detection metrics: image AUROC / F1-max (exact), pixel AUROC / AUPRO / F1-max (streaming).

Pixel metrics never keep maps: each map is folded into histograms over `bins` equal-width score bins on
[lo, hi] (65536 bins: the resolution of the 16-bit heatmaps), plus, for AUPRO, one accumulated
per-region overlap histogram. Memory is O(bins) whatever the archive size. Thresholds are the bin edges,
so for scores on the bin grid the result is exact (tests compare with scikit-learn and a brute-force AUPRO).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

# The paper's table: I-AUROC, P-AUROC, PRO (= AUPRO to FPR 0.3); every metric computed per product.
PAPER_METRICS = ("image_auroc", "pixel_auroc", "aupro")
METRICS = PAPER_METRICS + ("image_f1_max", "pixel_f1_max")


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC with ties counted half (Mann-Whitney U). NaN when a class is missing."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks of ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best F1 over all thresholds 'score >= t'."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if labels.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # evaluate only after the last of tied scores
    tp, fp = tp[last], fp[last]
    f1 = 2 * tp / (tp + fp + labels.sum())
    return float(f1.max())


def _curve_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [0, x_max], x ascending, interpolating at x_max."""
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs[-1] < x_max and keep.sum() < len(x):
        j = keep.sum()
        t = (x_max - x[j - 1]) / (x[j] - x[j - 1]) if x[j] > x[j - 1] else 0.0
        xs = np.r_[xs, x_max]
        ys = np.r_[ys, y[j - 1] + t * (y[j] - y[j - 1])]
    return float(np.trapezoid(ys, xs))


class PixelMetrics:
    """Streaming pixel AUROC, AUPRO (to FPR 0.3) and F1-max for one product."""

    def __init__(self, lo: float = 0.0, hi: float = 1.0, bins: int = 65536, fpr_limit: float = 0.3):
        self.lo, self.hi, self.bins, self.fpr_limit = lo, hi, bins, fpr_limit
        self.pos = np.zeros(bins, dtype=np.int64)      # defect pixels per score bin
        self.neg = np.zeros(bins, dtype=np.int64)      # normal pixels per score bin
        self.region = np.zeros(bins, dtype=np.float64)  # sum over regions of (region pixels in bin) / region size
        self.n_regions = 0
        self.clipped = 0                               # scores outside [lo, hi] (reported, not hidden)

    def _bin(self, amap: np.ndarray) -> np.ndarray:
        a = np.asarray(amap, dtype=np.float64)
        self.clipped += int(((a < self.lo) | (a > self.hi)).sum())
        idx = np.floor((a - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64)
        return np.clip(idx, 0, self.bins - 1)

    def update(self, amap: np.ndarray, mask: np.ndarray) -> None:
        """Fold one [H, W] map and its bool [H, W] ground truth in."""
        mask = np.asarray(mask, dtype=bool)
        idx = self._bin(amap)
        self.pos += np.bincount(idx[mask], minlength=self.bins)
        self.neg += np.bincount(idx[~mask], minlength=self.bins)
        labels, n = ndimage.label(mask)  # each connected ground-truth region counts once in PRO
        for r in range(1, n + 1):
            sel = idx[labels == r]
            np.add.at(self.region, sel, 1.0 / sel.size)
        self.n_regions += n

    def _rates(self):
        """Per threshold (bin edges, descending, plus 'above everything'): TP, FP counts and PRO."""
        tp = np.r_[0, np.cumsum(self.pos[::-1])]
        fp = np.r_[0, np.cumsum(self.neg[::-1])]
        pro = np.r_[0.0, np.cumsum(self.region[::-1])] / max(self.n_regions, 1)
        return tp, fp, pro

    def compute(self) -> dict[str, float]:
        tp, fp, pro = self._rates()
        P, N = tp[-1], fp[-1]
        if P == 0 or N == 0:
            return {"pixel_auroc": float("nan"), "aupro": float("nan"), "pixel_f1_max": float("nan")}
        tpr, fpr = tp / P, fp / N
        prec = np.divide(tp, tp + fp, out=np.zeros(len(tp)), where=(tp + fp) > 0)
        f1 = np.divide(2 * prec * tpr, prec + tpr, out=np.zeros(len(tp)), where=(prec + tpr) > 0)
        return {
            "pixel_auroc": float(np.trapezoid(tpr, fpr)),
            "aupro": _curve_area(fpr, pro, self.fpr_limit) / self.fpr_limit,
            "pixel_f1_max": float(f1.max()),
        }

    def curves(self, points: int = 512) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Pixel ROC (fpr, tpr) and PRO (fpr, pro) curves, at most `points` points each (for figures)."""
        tp, fp, pro = self._rates()
        if tp[-1] == 0 or fp[-1] == 0:
            return {}
        fpr, tpr = fp / fp[-1], tp / tp[-1]
        keep = _thin(fpr, tpr, points)
        return {"pixel_roc": (fpr[keep], tpr[keep]), "pro": (fpr[keep], pro[keep])}


def _thin(x: np.ndarray, y: np.ndarray, points: int) -> np.ndarray:
    """Indices of at most `points` points spread along a monotone curve (ends kept)."""
    step = np.r_[0, np.cumsum(np.hypot(np.diff(x), np.diff(y)))]
    targets = np.linspace(0, step[-1], points)
    return np.unique(np.r_[0, np.searchsorted(step, targets).clip(0, len(x) - 1), len(x) - 1])


def image_roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image-level ROC (fpr, tpr) over thresholds 'score >= t' (ties step together)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


class ProductMetrics:
    """All metrics of one product: image-level lists (one float per image) + streaming pixel metrics."""

    def __init__(self):
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.pixel = PixelMetrics()

    def update(self, score: float, label: int, amap: np.ndarray | None, mask: np.ndarray | None) -> None:
        self.scores.append(float(score))
        self.labels.append(int(label))
        if amap is not None and mask is not None:
            self.pixel.update(amap, mask)

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{'image_roc', 'pixel_roc', 'pro'}: (x, y) arrays, where the classes are present."""
        y = np.array(self.labels)
        out = self.pixel.curves()
        if 0 < y.sum() < len(y):
            out["image_roc"] = image_roc(np.array(self.scores), y)
        return out

    def compute(self) -> dict[str, float]:
        s, y = np.array(self.scores), np.array(self.labels)
        return {"image_auroc": auroc(s, y), "image_f1_max": f1_max(s, y), **self.pixel.compute(),
                "n_images": float(len(s)), "n_defective": float(y.sum())}


def summarize(per_product: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over products of each metric (the paper's 'mean' column), NaNs skipped."""
    keys = [k for k in next(iter(per_product.values())) if not k.startswith("n_")]
    return {k: float(np.nanmean([m[k] for m in per_product.values()])) for k in keys}
