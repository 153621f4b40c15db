"""The synthetic products: base patterns and their variants (many-product deployments)."""
import numpy as np
import pytest

from pipeline.sources.synthetic import DEFECTS, PRODUCTS, add_defect, make_mvtec_folder, normal_image, product_names


def test_product_names_are_distinct_base_patterns_first():
    names = product_names(15)
    assert len(set(names)) == 15 and names[:5] == PRODUCTS
    assert names[5:7] == ("tile-2", "washer-2") and names[-1] == "grid-3"


def test_a_variant_is_its_own_product_and_deterministic():
    base = normal_image("tile", 64, np.random.default_rng(0))
    var = normal_image("tile-2", 64, np.random.default_rng(0))
    assert np.abs(base.astype(int) - var.astype(int)).mean() > 10  # other colours / scale
    assert np.array_equal(var, normal_image("tile-2", 64, np.random.default_rng(0)))


@pytest.mark.parametrize("bad", ["tile-1", "tile-x", "gear-2"])
def test_bad_variant_names_are_refused(bad):
    with pytest.raises(ValueError):
        normal_image(bad, 32, np.random.default_rng(0))


@pytest.mark.parametrize("product", ["tile", "washer", "fabric", "pill", "grid", "pill-3"])
@pytest.mark.parametrize("defect", DEFECTS)
def test_a_defect_changes_exactly_the_pixels_of_its_mask(product, defect):
    for seed in range(3):
        rng = np.random.default_rng(seed)
        img = normal_image(product, 64, rng)
        out, mask = add_defect(img, defect, rng)
        assert mask.dtype == bool and 0 < mask.sum() < mask.size
        assert np.array_equal((out != img).any(-1), mask)


def test_the_folder_holds_each_defect_image_with_its_mask(tmp_path):
    from PIL import Image

    make_mvtec_folder(str(tmp_path), ("pill-3",), n_train=2, n_test_good=1, n_test_defect=2, size=48)
    root = tmp_path / "pill-3"
    good = [np.asarray(Image.open(f)) for f in sorted((root / "train" / "good").iterdir())]
    assert len(good) == 2 and good[0].shape == (48, 48, 3)
    for defect in DEFECTS:
        for i in range(2):
            img = np.asarray(Image.open(root / "test" / defect / f"{i:03d}.png")).astype(int)
            mask = np.asarray(Image.open(root / "ground_truth" / defect / f"{i:03d}_mask.png")) > 0
            assert mask.shape == (48, 48) and 0 < mask.sum() < mask.size
            # the defect is drawn in one colour (+ noise of std 3): a mask that strays onto the product's
            # pattern (its two tones are > 100 apart) would take in pixels far from that colour
            assert img[mask].std(0).max() < 12, (defect, img[mask].std(0))
