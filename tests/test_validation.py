"""The validation signal training runs on (pseudo-anomalies held out of training, on normals only) and the
weighted fusion it chooses."""
import dataclasses

import numpy as np
import pytest
import torch

from pipeline.fitting.prompts import ValRecord, train_kinds
from pipeline.fitting.shots import ProductShots, load_shots
from pipeline.fitting.validation import build_validation, gain, on_rank0, validate, verdict
from pipeline.model.anomaly_map import blur
from pipeline.model.config import FUSION_WEIGHTS, IMAGE_SCORES, AnoPLeConfig
from pipeline.model.scoring import fuse
from pipeline.sources.ingest import ingest
from pipeline.sources.synthetic import make_mvtec_folder


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    make_mvtec_folder(str(root / "src"), ("tile", "washer"), n_train=4, n_test_good=1, n_test_defect=1, size=64, seed=3)
    ingest(str(root / "src"), str(root / "arch"), "v", "2026-01-01")
    return load_shots(str(root / "arch"), "v", ["tile", "washer"], 1, 0)


def test_the_set_is_held_out_normals_clean_and_with_a_held_out_pseudo_anomaly(shots):
    vs = build_validation(shots, ["tile", "washer"], 64, ("perlin",), per_product=2, seed=0)
    assert vs.pixels.shape == (8, 3, 64, 64) and vs.products == ["tile"] * 4 + ["washer"] * 4
    assert vs.labels.tolist() == [0, 1] * 4 and vs.source == {"tile": "heldout_normals", "washer": "heldout_normals"}
    assert all(vs.shots[p].shape == (1, 3, 64, 64) for p in ("tile", "washer"))
    changed = (vs.pixels[1::2] != vs.pixels[0::2]).any(1)  # [4, S, S] the pixels the pseudo-anomaly moved
    assert torch.equal(changed, vs.masks[1::2]) and not vs.masks[0::2].any()  # exact masks, clean normals
    again = build_validation(shots, ["tile", "washer"], 64, ("perlin",), per_product=2, seed=0)
    assert torch.equal(again.pixels, vs.pixels)  # the same set at every validation of a run
    # the validation kinds are never drawn in training
    assert "perlin" not in train_kinds(AnoPLeConfig()) and train_kinds(AnoPLeConfig(val_kinds=("paste",)))


def test_without_held_out_normals_the_shots_views_stand_in(shots):
    only = {p: ProductShots(d.images, d.shots, []) for p, d in shots.items()}
    vs = build_validation(only, ["tile"], 64, ("perlin", "noise"), per_product=3, seed=0)
    assert vs.source == {"tile": "shot_views"} and vs.labels.tolist() == [0, 1] * 3


def test_validate_reports_each_map_and_chooses_the_fusion_weight(shots, tiny_model):
    vs = build_validation(shots, ["tile", "washer"], 64, ("perlin",), per_product=2, seed=0)
    out = validate(tiny_model(fusion="weighted"), vs, "cpu")
    assert set(out) == {"bank_pixel_auroc", "text_pixel_auroc", "fused_pixel_auroc", "fused_image_auroc",
                        "fusion_weight", "image_score"} | {f"image_auroc_{m}" for m in IMAGE_SCORES}
    assert out["image_score"] in range(len(IMAGE_SCORES))  # the image score chosen (image_score auto), an index
    assert out["fusion_weight"] in FUSION_WEIGHTS and all(0 <= v <= 1 for k, v in out.items() if k != "image_score")
    fixed = validate(tiny_model(fusion="weighted", fusion_weight=0.0), vs, "cpu")
    assert "fusion_weight" not in fixed and fixed["fused_pixel_auroc"] == pytest.approx(fixed["bank_pixel_auroc"])
    assert out["fused_pixel_auroc"] >= fixed["fused_pixel_auroc"]  # the chosen w is at least as good as w = 0
    assert on_rank0(lambda: out, 0, 1) == out


def test_weighted_fusion_reads_each_map_in_units_of_its_normal_level():
    cfg = AnoPLeConfig(fusion="weighted", fusion_weight=0.0, blur_sigma=0)
    g = torch.Generator().manual_seed(0)
    maps = {"text": torch.rand(2, 8, 8, generator=g), "bank": 100 * torch.rand(2, 8, 8, generator=g)}
    scales = {"p": {"text": 0.5, "bank": 50.0}}
    s0, m0 = fuse(cfg, maps, ["p", "p"], scales)
    assert np.allclose(m0, blur(maps["bank"] / 50.0, 0).numpy())  # w = 0: the bank alone
    _, m1 = fuse(dataclasses.replace(cfg, fusion_weight=1.0), maps, ["p", "p"], scales)
    assert np.allclose(m1, (maps["text"] / 0.5).numpy())  # w = 1: the decoder alone, though 100x smaller
    _, mh = fuse(cfg, maps, ["p", "p"], scales, weight=0.5)
    assert np.allclose(mh, 0.5 * (maps["text"] / 0.5 + maps["bank"] / 50.0).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="fusion_weight"):
        AnoPLeConfig(fusion="weighted", fusion_weight=1.5)


def test_a_run_that_adds_nothing_says_so():
    flat = ValRecord(best=0.801, best_epoch=0, baseline={"bank_pixel_auroc": 0.80})
    line, warning = verdict(gain(flat) | {"sources": {"a": "heldout_normals"}})
    assert "+0.1 points" in line and "at epoch 0" in line and "add nothing" in warning
    learned = ValRecord(best=0.85, best_epoch=5, baseline={"bank_pixel_auroc": 0.80})
    line, warning = verdict(gain(learned))
    assert "+5.0 points" in line and warning is None
