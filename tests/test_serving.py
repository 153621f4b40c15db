"""The MLflow pyfunc's predict (issue 23, item 5): every row answered with its own status, whatever it holds; a
request over the documented bounds answered with an error row each; scoring in bounded batches."""
import pandas as pd
import pytest
import torch

from pipeline import serving
from tests.test_fitting import _fitted


@pytest.fixture
def pyfunc(tiny_model):
    from pipeline.nightly.scorer import Scorer
    model = tiny_model()
    fit, data = _fitted(model)
    m = serving.AnoPLePyfunc()
    m.scorer = Scorer.from_fits(model, {"tile": fit}, "cpu")
    return m, data, model


def test_every_row_gets_its_own_status_whatever_it_holds(pyfunc):
    m, data, _ = pyfunc
    good = data.images[data.heldout[0]]
    frame = pd.DataFrame({"image": [good, "aGVsbG8=", None, 12, b"not an image", good, bytearray(good)],
                          "product": ["tile", "tile", "tile", "tile", "tile", 7, "tile"],
                          "image_id": ["a", "b", "c", "d", "e", "f", None]})
    out = m.predict(None, frame)
    assert list(out["status"]) == ["ok", "error", "error", "error", "error", "error", "ok"]
    assert "image is str" in out["error"][1] and "image is NoneType" in out["error"][2] and "image is int" in out["error"][3]
    assert "cannot decode image" in out["error"][4] and "unknown product None" in out["error"][5]
    assert out["score"][0] == out["score"][6] and out["score"][1:6].isna().all()


def test_a_request_over_the_bounds_is_an_error_row_each(pyfunc, monkeypatch):
    m, data, _ = pyfunc
    good = data.images[data.heldout[0]]
    monkeypatch.setattr(serving, "MAX_REQUEST_ROWS", 3)
    out = m.predict(None, pd.DataFrame({"image": [good] * 4, "product": ["tile"] * 4}))
    assert list(out["status"]) == ["error"] * 4 and all("over the limit of 3 rows" in e for e in out["error"])
    monkeypatch.setattr(serving, "MAX_REQUEST_ROWS", 100)
    monkeypatch.setattr(serving, "MAX_REQUEST_BYTES", 2 * len(good))
    out = m.predict(None, pd.DataFrame({"image": [good] * 3, "product": ["tile"] * 3}))
    assert list(out["status"]) == ["error"] * 3
    assert list(m.predict(None, pd.DataFrame({"image": [good] * 2, "product": ["tile"] * 2}))["status"]) == ["ok"] * 2


def test_scoring_runs_in_bounded_batches_and_a_failing_row_fails_alone(pyfunc, monkeypatch):
    m, data, model = pyfunc
    good = data.images[data.heldout[0]]
    m.batch_size = 4
    seen = []
    real = m.scorer.score

    def score(pixels, products):
        seen.append(len(products))
        if len(products) > 1:
            raise RuntimeError("out of memory")  # a batch fails: its rows are scored one by one
        return real(pixels, products)
    monkeypatch.setattr(m.scorer, "score", score)
    out = m.predict(None, pd.DataFrame({"image": [good] * 10, "product": ["tile"] * 10}))
    assert list(out["status"]) == ["ok"] * 10 and max(seen) == 4
    monkeypatch.setattr(m.scorer, "score", real)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if not n.startswith("clip.")).fill_(float("inf"))
    out = m.predict(None, pd.DataFrame({"image": [good] * 2, "product": ["tile"] * 2}))
    assert list(out["status"]) == ["error"] * 2 and "non-finite" in out["error"][0]
    assert out["score"].isna().all() and not out["is_anomalous"].any()
