import numpy as np
import pytest

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
