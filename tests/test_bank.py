import numpy as np
import pytest
import torch

from pipeline.artifact import ModelSpec, ProductSpec, plan_shards
from pipeline.fitting.bank import MemoryBank


def _unit(rng, n, c):
    x = rng.normal(size=(n, c)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_distance_is_mean_halved_cosine_distance_to_nearest_patch():
    rng = np.random.default_rng(0)
    layers = [_unit(rng, 50, 8), _unit(rng, 50, 8)]
    q = [torch.from_numpy(_unit(rng, 7, 8)) for _ in range(2)]
    got = MemoryBank(layers).distance(q).numpy()
    ref = np.mean([(1 - (qq.numpy() @ b.T).max(axis=1)) / 2 for qq, b in zip(q, layers)], axis=0)
    assert np.allclose(got, ref, atol=1e-6)
    # a bank patch queried against itself is at distance 0
    assert np.allclose(MemoryBank(layers).distance([torch.from_numpy(layers[0][:3]), torch.from_numpy(layers[1][:3])]).numpy(), 0, atol=1e-6)


def test_serialisation_round_trip():
    rng = np.random.default_rng(1)
    bank = MemoryBank([_unit(rng, 20, 4)])
    back = MemoryBank.from_bytes(bank.to_bytes())
    q = [torch.from_numpy(_unit(rng, 5, 4))]
    assert torch.equal(bank.distance(q), back.distance(q))
    assert back.n_patches == 20 and back.nbytes == 20 * 4 * 4


def test_layer_count_mismatch_is_an_error():
    with pytest.raises(ValueError):
        MemoryBank([_unit(np.random.default_rng(0), 4, 4)]).distance([torch.zeros(1, 4)] * 2)


def _spec(sizes):
    prods = {p: ProductSpec(threshold=0.1, calibration="heldout_normals", n_calibration=1, shots=["a"],
                            n_patches=n, bank_file=f"banks/{p}.npz") for p, n in sizes.items()}
    return ModelSpec(deployment="d", backbone="b", weights="random", weights_kind="random", weights_fingerprint="f",
                     seed=0, image_size=64, bank_layers=[1, 2], shots=1, feature_dim=256, products=prods)


def test_plan_shards_respects_the_budget():
    spec = _spec({"a": 1024, "b": 1024, "c": 512, "d": 4096})  # 2 MB, 2 MB, 1 MB, 8 MB
    assert plan_shards(spec, None) == [["a", "b", "c", "d"]]
    shards = plan_shards(spec, 3.0)
    assert sorted(p for s in shards for p in s) == ["a", "b", "c", "d"]
    assert ["d"] in shards  # larger than the budget: alone
    for s in shards:
        if s != ["d"]:
            assert sum({"a": 2, "b": 2, "c": 1}[p] for p in s) <= 3
