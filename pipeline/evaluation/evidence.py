"""What an evaluation leaves in its MLflow run, so the UI shows at a glance why a version is good or bad:
per-product ROC / PRO curves (figures), the per-product table (the run's table artifact), and example overlays of
the most anomalous defective image and the most anomalous normal one (the hardest false positive)."""
from __future__ import annotations

import datetime as dt

import numpy as np
from PIL import Image

from pipeline.drawing import contour, overlay
from pipeline.evaluation.metrics import METRICS, ProductMetrics
from pipeline.sources.images import decode_image, heatmap_scale


class Examples:
    """Per product, the top-scored defective and the top-scored normal image (id, score, map [S, S], mask)."""

    def __init__(self):
        self.best: dict[tuple[str, int], tuple[float, str, np.ndarray, np.ndarray]] = {}

    def offer(self, product: str, label: int, score: float, image_id: str, amap: np.ndarray, mask: np.ndarray) -> None:
        key = (product, int(label))
        if key not in self.best or score > self.best[key][0]:
            self.best[key] = (float(score), str(image_id), np.array(amap, dtype=np.float32), np.array(mask, dtype=bool))


def curves_figure(product: str, m: ProductMetrics, fpr_limit: float = 0.3):
    """One matplotlib figure: image ROC, pixel ROC, PRO to the FPR limit, with the areas in the titles."""
    import matplotlib
    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    r, c = m.compute(), m.curves()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    panels = [("image_roc", f"image ROC (AUROC {100 * r['image_auroc']:.1f})", "FPR", "TPR", 1.0),
              ("pixel_roc", f"pixel ROC (AUROC {100 * r['pixel_auroc']:.1f})", "FPR", "TPR", 1.0),
              ("pro", f"PRO (AUPRO@{fpr_limit} {100 * r['aupro']:.1f})", "FPR", "per-region overlap", fpr_limit)]
    for ax, (key, title, xl, yl, xmax) in zip(axes, panels):
        if key in c:
            x, y = c[key]
            ax.plot(x, y, lw=1.8)
        else:
            ax.text(0.5, 0.5, "one class only", ha="center")
        if key != "pro":  # chance level of a ROC
            ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        ax.set(xlim=(0, xmax), ylim=(0, 1.01), title=title, xlabel=xl, ylabel=yl)
    fig.suptitle(f"{product}: {int(r['n_images'])} test images, {int(r['n_defective'])} defective")
    fig.tight_layout()
    return fig


def table(results: dict[str, dict[str, float]], version: str) -> dict[str, list]:
    """The per-product table as columns (the run's table artifact), metrics in %."""
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    products = sorted(results)
    cols = {"product": products, "model_version": [version] * len(products), "evaluated_at": [when] * len(products)}
    for k in METRICS + ("n_images", "n_defective"):
        cols[k] = [round(100 * results[p][k], 2) if k in METRICS else int(results[p][k]) for p in products]
    return cols


def log_evaluation(log, per: dict[str, ProductMetrics], results: dict, examples: Examples, images: dict[str, bytes],
                   thresholds: dict[str, float], version: str) -> None:
    """Curves, table and example overlays into the run `log` (a registry.RunLog; artifact folder `evaluation/`)."""
    import matplotlib.pyplot as plt

    for p, m in sorted(per.items()):
        fig = curves_figure(p, m)
        log.figure(fig, f"evaluation/curves/{p}.png")
        plt.close(fig)
    log.table(table(results, version), "evaluation/per_product.json")
    for (p, label), (score, image_id, amap, mask) in sorted(examples.best.items()):
        thr = thresholds.get(p, float("nan"))
        size = amap.shape
        rgb = None
        if image_id in images:
            rgb = np.asarray(Image.fromarray(decode_image(images[image_id])).resize(size[::-1], Image.BILINEAR))
        pair = overlay(rgb, amap, heatmap_scale(thr, amap), thr)
        if mask.any():  # the ground truth, as a white outline on the image half
            arr = np.asarray(pair).copy()
            arr[:size[0], :size[1]][contour(mask)] = (255, 255, 255)
            pair = Image.fromarray(arr)
        kind = "defective-top" if label else "normal-top"
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in image_id)[-80:]
        log.image(pair, f"evaluation/examples/{p}/{kind}-{name}-score{score:.4f}.png")
