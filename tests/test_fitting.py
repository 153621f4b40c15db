import numpy as np
import pytest
import torch

from pipeline.errors import UsageError
from pipeline.fitting.shots import choose_shots, threshold_from


def test_shots_are_deterministic_per_seed_and_disjoint_from_calibration():
    ids = [f"p/train/good/{i:03d}" for i in range(10)]
    s0, rest0 = choose_shots(ids, 2, seed=0)
    assert choose_shots(list(reversed(ids)), 2, seed=0) == (s0, rest0)  # input order does not matter
    assert not set(s0) & set(rest0) and len(rest0) == 8
    assert choose_shots(ids, 2, seed=1)[0] != s0 or choose_shots(ids, 2, seed=2)[0] != s0
    with pytest.raises(UsageError, match="--shots 4 needs 4"):
        choose_shots(ids[:3], 4, seed=0)


def test_threshold_is_above_every_normal_calibration_score():
    s = [0.1, 0.12, 0.11, 0.3]
    assert threshold_from(s) >= 0.3
    assert threshold_from(s) == pytest.approx(max(0.3, np.mean(s) + 3 * np.std(s)))


def _shots(n=4, product="tile"):
    """One synthetic product's reference images: shot 0, the rest held out."""
    import io

    from PIL import Image

    from pipeline.fitting.shots import ProductShots
    from pipeline.sources.synthetic import normal_image

    rng = np.random.default_rng(0)
    images = {}
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(normal_image(product, 64, rng)).save(buf, format="PNG")
        images[f"{product}/{i}"] = buf.getvalue()
    ids = sorted(images)
    return ProductShots(images, ids[:1], ids[1:])


def _fitted(model):
    """A tiny model fitted on one synthetic product (1 shot, 3 held-out normals) through fit_products."""
    from pipeline.fitting.shots import fit_products
    data = {"tile": _shots()}
    return fit_products(model, data, ["tile"], "cpu")["tile"], data["tile"]


def _pixels(data, ids):
    from pipeline.sources.images import decode_image, to_model_input
    return np.stack([to_model_input(decode_image(data.images[i]), 64) for i in ids])


def test_map_levels_come_from_the_normal_calibration_images_and_scale_the_fusion(tiny_model):
    from pipeline.model.anomaly_map import blur, harmonic_fusion
    from pipeline.model.scoring import component_maps, encode, fuse, text_features

    model = tiny_model(fusion_calibrated=True)
    fit, data = _fitted(model)
    assert set(fit.map_scales) == {"text", "bank"} and fit.calibration == "heldout_normals"
    enc = encode(model, _pixels(data, data.heldout), "cpu")
    comp = component_maps(model, enc, ["tile"] * 3, {"tile": fit.bank}, text_features(model, ["tile"]))
    for k in ("text", "bank"):  # the level of each map: mean over the normals of its per-image maximum
        assert fit.map_scales[k] == pytest.approx(float(comp[k].flatten(1).amax(1).mean()), rel=1e-5)
    scores, maps = fuse(model.cfg, comp, ["tile"] * 3, {"tile": fit.map_scales})
    want = blur(harmonic_fusion(comp["text"] / fit.map_scales["text"], comp["bank"] / fit.map_scales["bank"]), 4.0)
    assert np.allclose(maps, want.numpy(), atol=1e-6)
    assert fit.calibration_scores == pytest.approx([float(s) for s in scores], rel=1e-5)
    assert fit.threshold == pytest.approx(threshold_from(fit.calibration_scores))
    # the switch really changes the computation: the raw harmonic mean is a different map
    raw = blur(harmonic_fusion(comp["text"], comp["bank"]), 4.0)
    assert not np.allclose(maps, raw.numpy(), atol=1e-4)
    assert torch.is_tensor(comp["text"]) and comp["text"].shape == (3, 64, 64)


def test_raw_harmonic_fusion_ignores_the_levels(tiny_model):
    from pipeline.model.anomaly_map import blur, harmonic_fusion
    from pipeline.model.scoring import fuse

    comp = {"text": torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.1,
            "bank": torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(2)) * 0.3}
    _, maps = fuse(tiny_model().cfg, comp, ["tile", "tile"], {"tile": {"text": 0.5, "bank": 0.05}})
    assert np.allclose(maps, blur(harmonic_fusion(comp["text"], comp["bank"]), 4.0).numpy(), atol=1e-6)


def test_the_scorer_built_from_fits_scores_like_calibration(tiny_model):
    """Calibration and scoring are one computation: the held-out normals score exactly their calibration scores."""
    from pipeline.nightly.scorer import Scorer

    model = tiny_model()
    fit, data = _fitted(model)
    scorer = Scorer.from_fits(model, {"tile": fit}, "cpu")
    assert scorer.thresholds == {"tile": fit.threshold} and set(scorer.text) == {"tile"}
    scores, maps = scorer.score(_pixels(data, data.heldout), ["tile"] * 3)
    assert scores == pytest.approx(fit.calibration_scores, rel=1e-5) and maps.shape == (3, 64, 64)
    from pipeline.nightly.scorer import UnknownProductError
    with pytest.raises(UnknownProductError, match="washer"):
        scorer.score(_pixels(data, data.heldout[:1]), ["washer"])


@pytest.mark.parametrize("n,how,n_cal", [(1, "shots_augmented", 4), (3, "shots_leave_one_out", 3)])
def test_without_held_out_normals_the_shots_calibrate(tiny_model, n, how, n_cal):
    from pipeline.fitting.shots import ProductShots, fit_products

    data = _shots(n)
    only_shots = ProductShots(data.images, sorted(data.images), [])
    fit = fit_products(tiny_model(), {"tile": only_shots}, ["tile"], "cpu")["tile"]
    assert fit.calibration == how and len(fit.calibration_scores) == n_cal
    assert fit.bank.n_patches == n * 16 and fit.spec().n_patches == n * 16  # every shot's 4x4 patches


def test_map_levels_survive_the_artifact_round_trip(tmp_path, tiny_model):
    from pipeline import artifact
    from pipeline.artifact import ModelSpec

    model = tiny_model(fusion_calibrated=True)
    fit, _ = _fitted(model)
    spec = ModelSpec(deployment="d", backbone="b", weights="random", weights_kind="random", weights_fingerprint="f",
                     seed=0, image_size=64, bank_layers=list(model.bank_layers), shots=1, feature_dim=int(model.d_v),
                     products={"tile": fit.spec()})
    artifact.save_spec(spec, str(tmp_path))
    (tmp_path / artifact.bank_file("tile")).parent.mkdir(parents=True)
    (tmp_path / artifact.bank_file("tile")).write_bytes(fit.bank.to_bytes())  # load_spec checks every bank's shape
    back = artifact.load_spec(str(tmp_path))
    assert back.products["tile"].map_scales == fit.map_scales and back.products["tile"] == fit.spec()
    # an artifact written before map levels existed still loads (levels default to none = 1)
    import json
    d = json.loads(spec.to_json())
    del d["products"]["tile"]["map_scales"]
    assert ModelSpec.from_json(json.dumps(d)).products["tile"].map_scales == {}


def test_undecodable_normals_are_left_out_of_the_shots_and_counted(tmp_path):
    from pipeline.fitting.shots import load_shots
    from pipeline.sources.ingest import ingest
    from pipeline.sources.synthetic import make_mvtec_folder

    src = make_mvtec_folder(str(tmp_path / "src"), ("tile", "pill"), n_train=4, n_test_good=0, n_test_defect=0, size=32)
    (tmp_path / "src" / "tile" / "train" / "good" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    for name in ("000", "001", "002", "003"):
        (tmp_path / "src" / "pill" / "train" / "good" / f"{name}.png").write_bytes(b"not an image")
    ingest(src, str(tmp_path / "a"), "d", "2026-01-01")
    data = load_shots(str(tmp_path / "a"), "d", ["tile"], 2, seed=0)["tile"]
    assert len(data.skipped) == 1 and data.skipped[0].startswith("tile/train/good/001: cannot decode")
    assert "tile/train/good/001" not in data.shots + data.heldout and len(data.shots) == 2 and len(data.heldout) == 1
    with pytest.raises(UsageError, match="product 'pill': only 0 decodable normal train images \\(4 do not decode\\)"):
        load_shots(str(tmp_path / "a"), "d", ["pill"], 1, seed=0)


def test_one_in_process_fit_learns_on_the_teaching_products_and_fits_only_this_processs(tiny_model):
    """learn_and_fit_products: what each Ray Train worker and the in-process benchmarks run."""
    from pipeline.fitting.learn import learn_and_fit_products
    from pipeline.fitting.shots import fit_products

    data = {"tile": _shots(product="tile"), "washer": _shots(product="washer")}
    knobs = dict(epochs=2, steps_per_epoch=1, batch_shots=1, val_images=2, patience=4)
    model = tiny_model(**knobs)
    got = learn_and_fit_products(model, data, ["tile", "washer"], ["washer"], "cpu", seed=0)
    assert sorted(got.fits) == ["washer"] and [e["epoch"] for e in got.epochs] == [1, 2]
    assert got.val_set is not None and got.validation.best_epoch >= 0 and got.train_seconds > 0
    assert sorted(got.val_set.source) == ["tile", "washer"]  # validated on the teaching products
    # without training: the untouched model's banks, exactly as fit_products builds them
    untrained = tiny_model(**knobs)
    plain = learn_and_fit_products(untrained, data, ["tile"], ["tile"], "cpu", seed=0, train=False)
    assert plain.epochs == [] and plain.validation is None and plain.val_set is None
    direct = fit_products(tiny_model(**knobs), data, ["tile"], "cpu")["tile"]
    assert plain.fits["tile"].threshold == direct.threshold
