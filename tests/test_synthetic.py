"""The synthetic products: base patterns and their variants (many-product deployments)."""
import numpy as np
import pytest

from pipeline.synthetic import PRODUCTS, _base, make_mvtec_folder, product_names


def test_product_names_are_distinct_base_patterns_first():
    names = product_names(15)
    assert len(set(names)) == 15 and names[:5] == PRODUCTS
    assert names[5:7] == ("tile-2", "washer-2") and names[-1] == "grid-3"


def test_a_variant_is_its_own_product_and_deterministic():
    base = _base("tile", 64, np.random.default_rng(0))
    var = _base("tile-2", 64, np.random.default_rng(0))
    assert np.abs(base.astype(int) - var.astype(int)).mean() > 10  # other colours / scale
    assert np.array_equal(var, _base("tile-2", 64, np.random.default_rng(0)))


@pytest.mark.parametrize("bad", ["tile-1", "tile-x", "gear-2"])
def test_bad_variant_names_are_refused(bad):
    with pytest.raises(ValueError):
        _base(bad, 32, np.random.default_rng(0))


def test_variants_get_defects_with_exact_masks(tmp_path):
    make_mvtec_folder(str(tmp_path), ("pill-3",), n_train=1, n_test_good=0, n_test_defect=1, size=48)
    assert (tmp_path / "pill-3" / "ground_truth" / "stain" / "000_mask.png").exists()
