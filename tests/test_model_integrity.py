"""A model folder is loaded only as training registered it (issue 23, items 2 and 3): every file a loader reads
matches the manifest, the manifest the hash the version records; a spec no training writes (NaN or negative
threshold, a bank file out of the folder), a bank of the wrong width and non-finite weights are refused with the
file or field named, before any row scores."""
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline import artifact
from pipeline.artifact import ModelRefused
from tests.conftest import TINY
from tests.test_fitting import _fitted, _pixels


@pytest.fixture
def model_dir(tmp_path, tiny_clip):
    """A trained tiny model's artifact folder as training writes it (spec, prompts, bank, manifest), and the
    manifest's SHA-256 (what the registered version records)."""
    from pipeline.fitting.weights import build_model, fingerprint
    from pipeline.model.config import AnoPLeConfig

    cfg = AnoPLeConfig()
    model = build_model(TINY, "random", 0, cfg, "cpu")
    fit, data = _fitted(model)
    out = tmp_path / "model"
    out.mkdir()
    spec = artifact.ModelSpec(
        deployment="d", backbone=TINY, weights="random", weights_kind="random", weights_fingerprint=fingerprint(model.clip),
        seed=0, image_size=model.image_size, bank_layers=list(model.bank_layers), shots=1, feature_dim=int(model.d_v),
        anople=cfg.to_dict() | {"bank_layers": list(model.bank_layers), "decoder_layers": list(model.decoder_layers),
                                "prompt_depth": model.J},
        prompts_file=artifact.PROMPTS, products={"tile": fit.spec()})
    artifact.save_spec(spec.validate(), str(out))
    (out / artifact.PROMPTS).write_bytes(st_save(model.prompt_state()))
    (out / artifact.bank_file("tile")).parent.mkdir(parents=True, exist_ok=True)
    (out / artifact.bank_file("tile")).write_bytes(fit.bank.to_bytes())
    digest = artifact.write_manifest(str(out))
    return out, digest, _pixels(data, data.heldout[:2])


def _load(out, digest):
    from pipeline.nightly.scorer import Scorer
    return Scorer.load(str(out), device="cpu", expected_sha256=digest)


def _rewrite_spec(out, change):
    d = json.loads((out / "model.json").read_text())
    change(d)
    (out / "model.json").write_text(json.dumps(d))


def test_the_registered_folder_loads_and_scores(model_dir):
    out, digest, pixels = model_dir
    scores, _ = _load(out, digest).score(pixels, ["tile", "tile"])
    assert all(np.isfinite(scores))


@pytest.mark.parametrize("name", ["model.json", artifact.PROMPTS, artifact.bank_file("tile")])
def test_a_file_changed_after_registration_is_refused_by_name(model_dir, name):
    out, digest, _ = model_dir
    path = out / name
    data = bytearray(path.read_bytes())
    data[-2] ^= 1  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(ModelRefused, match=re.escape(name) + " was changed after registration"):
        _load(out, digest)  # an actor
    with pytest.raises(ModelRefused, match=re.escape(name) + " was changed after registration"):
        artifact.load_spec(str(out), digest)  # the driver (registry.resolve), before any actor starts


def test_a_rewritten_manifest_is_refused_against_the_versions_record(model_dir):
    """Changing a file and rewriting the manifest to match does not pass: the version records the manifest's hash."""
    out, digest, _ = model_dir
    _rewrite_spec(out, lambda d: d["products"]["tile"].update(threshold=1e9))
    artifact.write_manifest(str(out))
    with pytest.raises(ModelRefused, match="manifest.json is not the one registered"):
        _load(out, digest)
    with pytest.raises(ModelRefused, match="is missing, but the version records one"):
        os.remove(out / artifact.MANIFEST)
        _load(out, digest)


@pytest.mark.parametrize("threshold", [float("nan"), None, 0.0, -1.0, float("inf"), "0.5"])
def test_a_threshold_no_training_writes_is_refused(model_dir, threshold):
    out, _, _ = model_dir
    _rewrite_spec(out, lambda d: d["products"]["tile"].update(threshold=threshold))
    digest = artifact.write_manifest(str(out))  # even a consistently re-signed folder: the value itself is refused
    with pytest.raises(ModelRefused, match="threshold"):
        _load(out, digest)


def test_a_bank_file_out_of_the_folder_is_refused(model_dir):
    out, _, _ = model_dir
    _rewrite_spec(out, lambda d: d["products"]["tile"].update(bank_file="../../etc/passwd"))
    digest = artifact.write_manifest(str(out))
    with pytest.raises(ModelRefused, match="names bank file"):
        _load(out, digest)


def test_a_bank_of_the_wrong_width_is_refused_before_scoring(model_dir):
    from pipeline.fitting.bank import MemoryBank
    out, _, _ = model_dir
    path = out / artifact.bank_file("tile")
    bank = MemoryBank.from_bytes(path.read_bytes(), "faiss-cpu")
    narrow = [np.ascontiguousarray(f[:, :-1]) for f in bank.layers]
    path.write_bytes(MemoryBank(narrow, "faiss-cpu").to_bytes())
    digest = artifact.write_manifest(str(out))
    for load in (lambda: _load(out, digest), lambda: artifact.load_spec(str(out), digest)):  # actor, then driver
        with pytest.raises(ModelRefused, match=re.escape(artifact.bank_file("tile")) + r" layer 0 is \[\d+, \d+\], expected"):
            load()


def test_non_finite_prompt_weights_are_refused(model_dir):
    out, _, _ = model_dir
    state = st_load((out / artifact.PROMPTS).read_bytes())
    k = sorted(state)[0]
    state[k] = torch.full_like(state[k], float("nan"))
    (out / artifact.PROMPTS).write_bytes(st_save(state))
    digest = artifact.write_manifest(str(out))
    with pytest.raises(ModelRefused, match=f"{artifact.PROMPTS} is refused.*{k}"):
        _load(out, digest)


def test_prompts_of_another_shape_are_refused(model_dir):
    out, _, _ = model_dir
    state = st_load((out / artifact.PROMPTS).read_bytes())
    k = sorted(state)[0]
    state[k] = torch.zeros(*state[k].shape[:-1], state[k].shape[-1] + 1)
    (out / artifact.PROMPTS).write_bytes(st_save(state))
    digest = artifact.write_manifest(str(out))
    with pytest.raises(ModelRefused, match=f"{artifact.PROMPTS} is refused.*{k}"):
        _load(out, digest)


def test_a_folder_without_manifest_loads_only_when_the_version_records_none(model_dir):
    """Versions registered before manifests existed still score (with a warning that nothing was checked)."""
    import logging
    out, _, pixels = model_dir
    os.remove(out / artifact.MANIFEST)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger(artifact.__name__).addHandler(handler)
    try:
        scorer = _load(out, None)
    finally:
        logging.getLogger(artifact.__name__).removeHandler(handler)
    assert any("not checked" in m for m in seen)
    assert all(np.isfinite(scorer.score(pixels, ["tile", "tile"])[0]))


def test_a_non_finite_score_is_an_error_row_not_a_silent_ok(tiny_model):
    """Weights that overflow at run time (a check cannot see every input) give error rows, never "ok" with NaN."""
    from pipeline.nightly.score_table import RunInfo
    from pipeline.nightly.scorer import Scorer
    from pipeline.nightly.stages import ScoreActor
    from pipeline.sources.decoding import decode_batch

    model = tiny_model()
    fit, data = _fitted(model)
    actor = ScoreActor.around(Scorer.from_fits(model, {"tile": fit}, "cpu"), RunInfo("d", "m", "1", "r"))
    ids = data.heldout[:2]
    batch = decode_batch({"image_id": np.array(ids, dtype=object), "product": np.array(["tile"] * 2, dtype=object),
                          "image": np.array([data.images[i] for i in ids], dtype=object)}, model.image_size,
                         with_masks=False)
    assert list(actor(dict(batch))["status"]) == ["ok", "ok"]
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if not n.startswith("clip.")).fill_(float("inf"))
    out = actor(dict(batch))
    assert list(out["status"]) == ["error", "error"] and all("non-finite" in e for e in out["error"])
