import numpy as np
import pytest
import torch

from pipeline.fitting import choose_shots, threshold_from


def test_shots_are_deterministic_per_seed_and_disjoint_from_calibration():
    ids = [f"p/train/good/{i:03d}" for i in range(10)]
    s0, rest0 = choose_shots(ids, 2, seed=0)
    assert choose_shots(list(reversed(ids)), 2, seed=0) == (s0, rest0)  # input order does not matter
    assert not set(s0) & set(rest0) and len(rest0) == 8
    assert choose_shots(ids, 2, seed=1)[0] != s0 or choose_shots(ids, 2, seed=2)[0] != s0
    with pytest.raises(ValueError, match="--shots 4 needs 4"):
        choose_shots(ids[:3], 4, seed=0)


def test_threshold_is_above_every_normal_calibration_score():
    s = [0.1, 0.12, 0.11, 0.3]
    assert threshold_from(s) >= 0.3
    assert threshold_from(s) == pytest.approx(max(0.3, np.mean(s) + 3 * np.std(s)))


def _fitted(fusion_calibrated):
    """A tiny model fitted on one synthetic product (1 shot, 3 held-out normals)."""
    import io

    from PIL import Image

    from pipeline.fitting import fit_product
    from pipeline.model.anople import AnoPLe, build_tokenizer
    from pipeline.model.backbone import create_clip
    from pipeline.model.config import AnoPLeConfig
    from pipeline.scorer import Scorer
    from pipeline.synthetic import _base
    from tests.conftest import TINY

    rng = np.random.default_rng(0)
    images = {}
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(_base("tile", 64, rng)).save(buf, format="PNG")
        images[f"tile/{i}"] = buf.getvalue()
    model = AnoPLe(create_clip(TINY, "random", seed=0), AnoPLeConfig(fusion_calibrated=fusion_calibrated),
                   build_tokenizer(TINY)).eval()
    scorer = Scorer(model, {}, "cpu")
    fit = fit_product("tile", images, ["tile/0"], ["tile/1", "tile/2", "tile/3"], scorer)
    return fit, scorer, images


def test_map_levels_come_from_the_normal_calibration_images_and_scale_the_fusion():
    from pipeline.images import decode_image, to_model_input
    from pipeline.model.anomaly_map import blur, harmonic_fusion

    fit, scorer, images = _fitted(fusion_calibrated=True)
    assert set(fit.map_scales) == {"text", "bank"} and scorer.scales["tile"] == fit.map_scales
    x = np.stack([to_model_input(decode_image(images[f"tile/{i}"]), 64) for i in (1, 2, 3)])
    comp = scorer.component_maps(scorer.encode(x), ["tile"] * 3, banks={"tile": fit.bank})
    for k in ("text", "bank"):  # the level of each map: mean over the normals of its per-image maximum
        assert fit.map_scales[k] == pytest.approx(float(comp[k].flatten(1).amax(1).mean()), rel=1e-5)
    scores, maps = scorer.fuse(comp, ["tile"] * 3)
    want = blur(harmonic_fusion(comp["text"] / fit.map_scales["text"], comp["bank"] / fit.map_scales["bank"]), 4.0)
    assert np.allclose(maps, want.numpy(), atol=1e-6)
    assert fit.calibration_scores == pytest.approx([float(s) for s in scores], rel=1e-5)
    # the switch really changes the computation: the raw harmonic mean is a different map
    raw = blur(harmonic_fusion(comp["text"], comp["bank"]), 4.0)
    assert not np.allclose(maps, raw.numpy(), atol=1e-4)
    assert torch.is_tensor(comp["text"]) and comp["text"].shape == (3, 64, 64)


def test_raw_harmonic_fusion_ignores_the_levels():
    from pipeline.model.anomaly_map import blur, harmonic_fusion

    fit, scorer, _ = _fitted(fusion_calibrated=False)
    comp = {"text": torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.1,
            "bank": torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(2)) * 0.3}
    _, maps = scorer.fuse(comp, ["tile", "tile"])
    assert np.allclose(maps, blur(harmonic_fusion(comp["text"], comp["bank"]), 4.0).numpy(), atol=1e-6)


def test_map_levels_survive_the_artifact_round_trip():
    from pipeline.artifact import ModelSpec, ProductSpec

    ps = ProductSpec(threshold=0.2, calibration="heldout_normals", n_calibration=3, shots=["a"], n_patches=16,
                     bank_file="banks/a.npz", map_scales={"text": 0.4, "bank": 0.05})
    spec = ModelSpec(deployment="d", backbone="b", weights="random", weights_kind="random", weights_fingerprint="f",
                     seed=0, image_size=64, bank_layers=[1], shots=1, feature_dim=8, products={"a": ps})
    back = ModelSpec.from_json(spec.to_json())
    assert back.products["a"].map_scales == {"text": 0.4, "bank": 0.05}
    _, scorer, _ = _fitted(fusion_calibrated=True)
    from pipeline.scorer import Scorer
    assert Scorer(scorer.model, {}, "cpu", back).scales == {"a": {"text": 0.4, "bank": 0.05}}  # what actors use
    # an artifact written before map levels existed still loads (levels default to none = 1)
    import json
    d = json.loads(spec.to_json())
    del d["products"]["a"]["map_scales"]
    assert ModelSpec.from_json(json.dumps(d)).products["a"].map_scales == {}
