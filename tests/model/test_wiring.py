"""AnoPLe wired as the paper (or, where it is silent, PromptAD) runs it: one test per wiring choice, on the tiny
random-init backbone. Each shows what the wiring does, not a score (random weights have nothing to score)."""
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.fitting.bank import MemoryBank
from pipeline.fitting.prompts import ShotBatch, make_views
from pipeline.fitting.shots import ProductShots, shot_batch
from pipeline.model.anople import AnoPLe, build_tokenizer, value_value_attention
from pipeline.model.config import IMAGE_SCORES, LEGACY_WIRING, AnoPLeConfig
from pipeline.model.pseudo import KINDS, latent_region, pixel_anomaly
from pipeline.model.scoring import GLOBAL, component_maps, fuse, text_features
from pipeline.sources.ingest import class_names

TINY = "anople-tiny-vit"


@pytest.fixture
def own_model(tiny_clip):
    """A model on its own copy of the tiny CLIP (these tests change backbone weights)."""
    def make(**knobs) -> AnoPLe:
        return AnoPLe(copy.deepcopy(tiny_clip), AnoPLeConfig(**knobs), build_tokenizer(TINY)).eval()
    return make


def _scores(m: AnoPLe, x: torch.Tensor, bank_x: torch.Tensor, products=("tile",)):
    """(image scores, fused maps) of x against a bank of bank_x, through the scorer's own functions."""
    with torch.no_grad():
        feats = m.bank_features(m.encode_image(bank_x))
        bank = MemoryBank([f.reshape(-1, f.shape[-1]).numpy() for f in feats])
        names = [products[0]] * len(x)
        maps = component_maps(m, m.encode_image(x), names, {products[0]: bank}, text_features(m, list(products)))
        return fuse(m.cfg, maps, names), maps


# 1. the global branch takes part in the image decision ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["global_map", "global_bank"])
def test_the_image_score_changes_when_only_the_global_branch_changes(own_model, mode):
    m = own_model(image_score=mode)
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(3, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    (s0, map0), comp0 = _scores(m, x, ref)
    assert GLOBAL in comp0 and comp0[GLOBAL].shape == (3,)
    with torch.no_grad():  # z_0's projection only: the decoder's adapters, the v-v path and the bank do not read it
        m.clip.visual.proj.mul_(-1.0).add_(0.05 * torch.randn(m.clip.visual.proj.shape, generator=g))
    (s1, map1), _ = _scores(m, x, ref)
    np.testing.assert_array_equal(map0, map1)  # the maps are untouched ...
    assert not np.allclose(s0, s1)             # ... and the image score moved with z_0
    m.cfg = AnoPLeConfig(image_score="map")
    (s_map, _), _ = _scores(m, x, ref)
    np.testing.assert_allclose(s_map, map1.reshape(3, -1).max(1), rtol=1e-6)  # "map": the map's max, z_0 unread


def test_the_global_image_score_is_the_harmonic_mean_of_z0s_probability_and_the_maps_max(own_model):
    m = own_model(image_score="global_map")
    g = torch.Generator().manual_seed(1)
    (s, amap), comp = _scores(m, torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g))
    p, top = comp[GLOBAL].numpy(), amap.reshape(2, -1).max(1)
    np.testing.assert_allclose(s, 2 * p * top / (p + top), rtol=1e-5)


def test_an_unresolved_auto_scores_by_the_map_and_a_bank_only_model_refuses_a_global_score():
    from pipeline.model.scoring import image_score_mode
    assert image_score_mode(AnoPLeConfig()) == "map" and AnoPLeConfig().image_score == "auto"
    with pytest.raises(ValueError, match="global branch"):
        AnoPLeConfig(prompt_mode="none", fusion="bank", image_score="global_bank")


def test_validation_chooses_the_image_score_and_training_records_it(own_model):
    from pipeline.fitting.prompts import train_prompts
    from pipeline.fitting.validation import IMAGE_SCORE_MARGIN, ValidationSet, validate
    m = own_model(epochs=1, steps_per_epoch=1, batch_shots=2, multiscale=False)
    g = torch.Generator().manual_seed(2)
    shots = ShotBatch(torch.randn(2, 3, 64, 64, generator=g), torch.tensor([0, 0]), ["tile"])
    x = torch.randn(4, 3, 64, 64, generator=g)
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    masks[1, 10:30, 20:40] = masks[3, 40:60, 5:25] = True
    vs = ValidationSet(x, masks, ["tile"] * 4, {"tile": shots.pixels}, {"tile": "heldout_normals"})
    got = validate(m, vs, "cpu")
    assert set(f"image_auroc_{s}" for s in IMAGE_SCORES) <= set(got)
    chosen = IMAGE_SCORES[int(got["image_score"])]
    best = max(got[f"image_auroc_{s}"] for s in IMAGE_SCORES)
    if chosen == "map":  # the map unless a z_0 score beats it by the margin
        assert best < got["image_auroc_map"] + IMAGE_SCORE_MARGIN
    else:
        assert got[f"image_auroc_{chosen}"] == best >= got["image_auroc_map"] + IMAGE_SCORE_MARGIN
    train_prompts(m, shots, "cpu", validate=lambda: validate(m, vs, "cpu"))
    assert m.cfg.image_score in IMAGE_SCORES  # "auto" resolved to the validation's choice at the best epoch


# 2. the quadrant crops carry the source's detail -----------------------------------------------------------------
def _checkerboard_shots(size: int) -> dict[str, ProductShots]:
    """One product, one shot: a grey image at 2x the model's size with a 1-pixel checkerboard (detail no 64 px
    view can hold: its 2x2 averages are all equal)."""
    yy, xx = np.mgrid[:2 * size, :2 * size]
    rgb = np.repeat(np.where((yy + xx) % 2 == 0, 60, 200).astype(np.uint8)[..., None], 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return {"tile": ProductShots({"s0": buf.getvalue()}, ["s0"], [])}


def _roughness(x: torch.Tensor) -> float:
    """Mean absolute difference of horizontally adjacent pixels."""
    return float((x[..., 1:] - x[..., :-1]).abs().mean())


def test_a_quadrant_crop_shows_source_detail_that_the_global_view_cannot(own_model):
    m = own_model(pseudo_prob=0.0)  # clean views: only the resizing is looked at
    data = _checkerboard_shots(m.image_size)
    views = make_views(m, shot_batch(data, ["tile"], m.image_size, detail=True), torch.Generator().manual_seed(0))
    glob, crops = views.x[0], views.x[1:]  # [3, S, S], [4, 3, S, S] (prefixes c_1..c_4)
    assert views.scale.tolist() == [0, 1, 2, 3, 4]
    assert _roughness(glob) < 0.05   # the global view: the checkerboard averages away
    assert _roughness(crops) > 2.0   # the crops: every pixel of the 2S image, the pattern intact (~2.4 normalised)
    legacy = own_model(pseudo_prob=0.0, crop_source="upsample")
    old = make_views(legacy, shot_batch(data, ["tile"], m.image_size, detail=False), torch.Generator().manual_seed(0))
    assert _roughness(old.x[1:]) < 0.5  # the earlier wiring: crops of an upsample of the blurred 64 px view


def test_detail_views_keep_pseudo_anomaly_masks_exact(own_model):
    m = own_model(pseudo_prob=1.0, pseudo_latent=False)
    g = torch.Generator().manual_seed(3)
    S = m.image_size
    shots = ShotBatch(torch.randn(2, 3, S, S, generator=g), torch.tensor([0, 0]), ["tile"],
                      torch.randn(2, 3, 2 * S, 2 * S, generator=g))
    v = make_views(m, shots, torch.Generator().manual_seed(4))
    clean = make_views(own_model(pseudo_prob=0.0), shots, torch.Generator().manual_seed(4))
    changed = (v.x != clean.x).any(1)  # [5n, S, S] pixels a pseudo-anomaly changed, in every view
    assert torch.equal(changed, v.mask.bool()) and v.label[:2].tolist() == [1, 1]


# 3. the [abnormal] token starts from CLIP's prior; products are named in words CLIP knows --------------------------
def test_the_abnormal_token_equals_the_words_embedding_at_initialisation(own_model):
    m = own_model()
    ids = m.tokenizer(["abnormal"])[0]
    word = ids[1:int(ids.argmax())]  # the word's BPE tokens between SOS and EOT
    assert len(word) == 1
    assert torch.equal(m.abnormal.detach(), m.clip.token_embedding.weight[word])
    assert not torch.allclose(own_model(abnormal_init="random").abnormal.detach(), m.clip.token_embedding.weight[word])
    two = own_model(n_abnormal=2, abnormal_word="damaged surface")  # 2 slots for a 2-token phrase: one each
    ids = m.tokenizer(["damaged surface"])[0]
    assert torch.equal(two.abnormal.detach(), m.clip.token_embedding.weight[ids[1:int(ids.argmax())]])


def test_the_prompts_use_a_products_class_words(own_model):
    m = own_model(class_names={"pcb1": "printed circuit board"})
    ids, slots = m._tokens(["pcb1", "PX-4471-B"])
    words = m.tokenizer(["printed circuit board"])[0]
    words = words[1:int(words.argmax())].tolist()
    normal = ids[0].tolist()
    assert normal[1 + slots:1 + slots + len(words)] == words  # after the learnable slots: the class words
    code = m.tokenizer(["PX 4471 B"])[0]
    assert ids[2].tolist()[1 + slots:1 + slots + int(code.argmax()) - 1] == code[1:int(code.argmax())].tolist()
    before = m.encode_text(["pcb1"])
    m.cfg = AnoPLeConfig(class_names={"pcb1": "macaroni"})
    assert not torch.allclose(before, m.encode_text(["pcb1"]))


def test_known_dataset_codes_map_to_words_and_the_user_wins():
    got = class_names(["pcb1", "chewinggum", "macaroni2", "audiojack", "transistor1", "metal_nut", "PX-4471-B"],
                      {"PX-4471-B": "brass valve"})
    assert got == {"pcb1": "printed circuit board", "chewinggum": "chewing gum", "macaroni2": "macaroni",
                   "audiojack": "audio jack", "transistor1": "transistor", "metal_nut": "metal nut",
                   "PX-4471-B": "brass valve"}
    assert class_names(["pcb1"], {"pcb1": "bare board"}) == {"pcb1": "bare board"}
    with pytest.raises(ValueError, match="class name"):
        AnoPLeConfig(class_names={"pcb1": "  "})


# 4. the decoder reads the value-value attention path ---------------------------------------------------------------
def test_value_value_attention_matches_its_formula_on_a_hand_made_block():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    x = torch.randn(3, 5, 8)
    w_v, b_v = attn.in_proj_weight[16:], attn.in_proj_bias[16:]
    v = x @ w_v.T + b_v  # [B, L, 8]
    heads = []
    for h in range(2):  # each head: softmax(v_h v_h^T / sqrt(d_h)) v_h
        vh = v[..., 4 * h:4 * (h + 1)]  # [B, L, 4]
        heads.append(torch.softmax(vh @ vh.transpose(1, 2) / 2.0, dim=-1) @ vh)
    want = torch.cat(heads, -1) @ attn.out_proj.weight.T + attn.out_proj.bias
    torch.testing.assert_close(value_value_attention(attn, x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="patch_path"):
        value_value_attention(nn.MultiheadAttention(8, 2, batch_first=False), x)


def test_the_decoder_reads_the_vv_path_as_clip_surgery_accumulates_it(own_model):
    # text prompts only, no prefix: the visual sequence is plain CLIP's, so the paths can be rebuilt by hand
    m = own_model(prompt_mode="text", use_prefix=False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    v = m.clip.visual
    with torch.no_grad():
        enc = m.encode_image(x)
        h = v._embeds(x)
        first = min(m.decoder_layers)
        x_vv, want_vv, want_qk = None, {}, {}
        for j, block in enumerate(v.transformer.resblocks):
            if j + 1 >= first:
                x_vv = (h if x_vv is None else x_vv) + value_value_attention(block.attn, block.ln_1(h))
            h = block(h)
            if j + 1 in m.decoder_layers:
                want_vv[j + 1], want_qk[j + 1] = x_vv[:, 1:], h[:, 1:]
        qk = own_model(prompt_mode="text", use_prefix=False, patch_path="qk").encode_image(x)
    for l in m.decoder_layers:
        torch.testing.assert_close(enc.patches[l], want_vv[l], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(qk.patches[l], want_qk[l], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(enc.patches[l], qk.patches[l])


# 5. the bank reads the frozen, unprompted CLIP --------------------------------------------------------------------
def test_the_banks_features_do_not_move_when_only_the_prompts_do(own_model):
    m = own_model()  # bidirectional prompts + prefix
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = m.encode_image(x)
        for p in (m.visual_ctx, m.text_ctx, m.prefix):
            p.add_(torch.randn_like(p))
        after = m.encode_image(x)
        plain = own_model(prompt_mode="none", fusion="bank").encode_image(x)  # CLIP with nothing learnable
    for l in m.bank_layers:
        assert torch.equal(before.bank[l], after.bank[l])
        torch.testing.assert_close(before.bank[l], plain.bank[l], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before.patches[max(m.decoder_layers)], after.patches[max(m.decoder_layers)])
    legacy = own_model(bank_source="prompted")
    with torch.no_grad():
        b0 = legacy.encode_image(x).bank[max(m.bank_layers)]
        legacy.visual_ctx.add_(torch.randn_like(legacy.visual_ctx))
        assert not torch.allclose(b0, legacy.encode_image(x).bank[max(m.bank_layers)])  # the earlier wiring moves


# 6. training draws irregular pseudo-anomalies --------------------------------------------------------------------
def _is_box(mask: torch.Tensor) -> bool:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return bool(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all())


def test_training_draws_irregular_pseudo_anomalies(own_model):
    # pixel pseudo-anomalies (latent ones on this 4 x 4 grid are 1-2 patches: see the latent test on 15 x 15)
    m = own_model(pseudo_prob=1.0, multiscale=False, pseudo_latent=False)  # default shape: irregular
    S = m.image_size
    shots = ShotBatch(torch.randn(8, 3, S, S, generator=torch.Generator().manual_seed(7)), torch.zeros(8, dtype=torch.long),
                      ["tile"])
    masks = torch.cat([make_views(m, shots, torch.Generator().manual_seed(s)).mask for s in range(4)])  # [32, S, S]
    drawn = [mk.bool() for mk in masks if mk.any()]
    assert len(drawn) == 32
    boxes = sum(_is_box(mk) for mk in drawn)
    assert boxes <= len(drawn) // 4, f"{boxes} of {len(drawn)} pseudo-anomalies are rectangles"
    old = own_model(pseudo_prob=1.0, multiscale=False, pseudo_latent=False, pseudo_shape="box")
    assert all(_is_box(mk.bool()) for mk in make_views(old, shots, torch.Generator().manual_seed(0)).mask)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "perlin"])
def test_each_training_kind_fills_a_blob_with_an_exact_mask(kind):
    img = torch.randn(3, 96, 96, generator=torch.Generator().manual_seed(8))
    out, mask = pixel_anomaly(img, kind, torch.Generator().manual_seed(9), shape="irregular")
    assert mask.any() and not _is_box(mask.bool())
    assert torch.equal((out != img).any(0), mask.bool())


def test_latent_regions_are_blobs_of_the_patch_grid():
    regions = [latent_region((15, 15), torch.Generator().manual_seed(s), shape="irregular") for s in range(20)]
    assert all(1 <= int(r.sum()) <= 0.16 * 225 for r in regions)
    assert sum(_is_box(r.view(15, 15)) for r in regions) <= 5


# 7. L_align: the weights follow the anomaly evidence once ---------------------------------------------------------
def test_align_pools_unit_patch_features_with_a_softmax_of_the_logits(own_model):
    m = own_model()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    text = m.encode_text(["tile"]).expand(2, -1, -1)
    enc = m.encode_image(x)
    head = m.text_head(enc, text)
    last = F.normalize(m.adapters[-1](m.clip.visual.ln_post(enc.patches[max(m.decoder_layers)])), dim=-1)  # [B, HW, D]
    M = (m.align_log_scale.exp() * head["logits"].flatten(1)).softmax(-1)  # [B, HW]
    torch.testing.assert_close(head["s"], torch.einsum("bn,bnd->bd", M, last), rtol=1e-5, atol=1e-6)
    head["s"].sum().backward()
    assert m.align_log_scale.grad is not None and m.align_log_scale.grad.abs() > 0


def test_the_legacy_align_pool_had_an_inert_bias():
    """Why it changed: with softmax(a * logit + b), b cancels; its gradient is zero whatever the batch."""
    lin = nn.Linear(1, 1)
    logits = torch.randn(2, 16)
    M = lin(logits.unsqueeze(-1)).squeeze(-1).softmax(-1)
    (M * torch.randn(2, 16)).sum().backward()
    assert abs(float(lin.bias.grad)) < 1e-6 and float(lin.weight.grad.abs()) > 0


# artifacts trained before the rewiring keep scoring as they were trained ------------------------------------------
def test_an_artifact_without_the_wiring_keys_loads_with_the_earlier_wiring():
    stored = {k: v for k, v in AnoPLeConfig().to_dict().items() if k not in LEGACY_WIRING and k != "class_names"}
    old = AnoPLeConfig.from_artifact(stored)
    assert all(getattr(old, k) == v for k, v in LEGACY_WIRING.items())
    new = AnoPLeConfig.from_artifact(AnoPLeConfig().to_dict())
    assert new == AnoPLeConfig()
