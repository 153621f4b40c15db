"""AnoPLe's components on a tiny random-init CLIP: shapes, gradients, switches, prefix, losses, pseudo-anomalies."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.fitting.prompts import ShotBatch, make_views, step_losses
from pipeline.model.anomaly_map import pixel_map
from pipeline.model.anople import Encoded, quadrant_views
from pipeline.model.losses import align_loss, dice_loss, focal_loss, image_loss
from pipeline.model.pseudo import KINDS, latent_mask_pixels, latent_region, pixel_anomaly

PRODUCTS = ["tile", "metal_nut"]


def _shots(n=2):
    return ShotBatch(torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(7)),
                     torch.arange(n) % len(PRODUCTS), PRODUCTS)


def _forward(model, x, products=PRODUCTS, scale=None):
    text = model.encode_text(products)
    enc = model.encode_image(x, scale=scale)
    return enc, model.text_head(enc, text[torch.arange(x.shape[0]) % len(products)])


def test_shapes(tiny_model):
    m = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    text = m.encode_text(PRODUCTS)
    assert text.shape == (2, 2, 64) and torch.allclose(text.norm(dim=-1), torch.ones(2, 2), atol=1e-5)
    enc, head = _forward(m, x)
    assert enc.z0.shape == (2, 64) and len(enc) == 2
    assert set(enc.patches) == set(m.decoder_layers) and set(enc.bank) == set(m.bank_layers)
    assert head["logits"].shape == (2, 1, 4, 4) and head["image_logits"].shape == (2, 2) and head["s"].shape == (2, 64)
    assert pixel_map(head["logits"], 64).shape == (2, 64, 64)
    assert quadrant_views(x, 64).shape == (8, 3, 64, 64)


def test_encoded_rows_and_cat_are_inverse(tiny_model):
    m = tiny_model()
    enc = m.encode_image(torch.randn(3, 3, 64, 64))
    parts = [enc.rows([0]), enc.rows([1, 2])]
    back = Encoded.cat(parts)
    assert torch.equal(back.z0, enc.z0) and back.patches.keys() == enc.patches.keys()
    assert all(torch.equal(back.patches[k], enc.patches[k]) for k in enc.patches)
    assert all(torch.equal(back.bank[k], enc.bank[k]) for k in enc.bank) and back.bank.keys() == enc.bank.keys()
    assert torch.equal(enc.rows([2]).bank[m.bank_layers[0]][0], enc.bank[m.bank_layers[0]][2])


def test_gradients_reach_only_trainable_parameters(tiny_model):
    m = tiny_model()
    step_losses(m, make_views(m, _shots(), torch.Generator().manual_seed(0)), PRODUCTS)["total"].backward()
    assert all(p.grad is None for p in m.clip.parameters())
    trainable = dict((n, p) for n, p in m.named_parameters() if not n.startswith("clip."))
    assert trainable and all(p.requires_grad for p in trainable.values())
    got = {n for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0}
    # prefixes of scales present in the batch, prompts of every prompted layer, maps, decoder, align
    for name in ("text_ctx", "visual_ctx", "abnormal", "prefix", "f_t2v.0.weight", "f_v2t.0.weight",
                 "decoder.0.weight", "align_log_scale"):
        assert name in got, name


@pytest.mark.parametrize("mode,has", [
    ("bi", {"text_ctx", "visual_ctx", "f_t2v", "f_v2t"}),
    ("t2i", {"text_ctx", "visual_ctx", "f_t2v"}),
    ("i2t", {"text_ctx", "visual_ctx", "f_v2t"}),
    ("text", {"text_ctx"}),
    ("visual", {"visual_ctx"}),
])
def test_prompt_mode_switches_the_parameters(tiny_model, mode, has):
    m = tiny_model(prompt_mode=mode)
    present = {n for n in ("text_ctx", "visual_ctx", "f_t2v", "f_v2t") if getattr(m, n) is not None}
    assert present == has


def _perturb(m, name):
    with torch.no_grad():
        p = dict(m.named_parameters())[name]
        p.add_(torch.randn_like(p))


def test_exchange_maps_really_carry_prompts_across_towers(tiny_model):
    x = torch.randn(2, 3, 64, 64)
    for mode, name, tower in [("t2i", "text_ctx", "image"), ("i2t", "visual_ctx", "text"),
                              ("bi", "text_ctx", "image"), ("bi", "visual_ctx", "text")]:
        m = tiny_model(prompt_mode=mode)
        before = (m.encode_image(x).z0 if tower == "image" else m.encode_text(PRODUCTS)).detach()
        _perturb(m, name)  # a prompt of the *other* tower
        after = (m.encode_image(x).z0 if tower == "image" else m.encode_text(PRODUCTS)).detach()
        assert not torch.allclose(before, after), (mode, name)
    # and without the map, the other tower's prompts have no path across
    for mode, name, tower in [("i2t", "text_ctx", "image"), ("t2i", "visual_ctx", "text"), ("text", "text_ctx", "image")]:
        m = tiny_model(prompt_mode=mode)
        before = (m.encode_image(x).z0 if tower == "image" else m.encode_text(PRODUCTS)).detach()
        _perturb(m, name)
        after = (m.encode_image(x).z0 if tower == "image" else m.encode_text(PRODUCTS)).detach()
        assert torch.equal(before, after), (mode, name)


def test_deep_prompts_act_at_every_prompted_layer(tiny_model):
    m = tiny_model(prompt_mode="visual")
    x = torch.randn(1, 3, 64, 64)
    before = m.encode_image(x).z0.detach()
    with torch.no_grad():
        m.visual_ctx[m.J - 1].add_(torch.randn_like(m.visual_ctx[m.J - 1]))  # only the last prompted layer
    assert not torch.allclose(before, m.encode_image(x).z0.detach())


def _losses(model, seed=1):
    views = make_views(model, _shots(), torch.Generator().manual_seed(seed))
    return {k: float(v.detach()) for k, v in step_losses(model, views, PRODUCTS).items()}


@pytest.mark.parametrize("switch,term", [("use_align_loss", "align"), ("use_pixel_loss", "pixel"),
                                         ("use_img_loss", "img")])
def test_each_loss_switch_removes_exactly_its_term(tiny_model, switch, term):
    full, off = _losses(tiny_model()), _losses(tiny_model(**{switch: False}))
    assert full[term] > 0 and off[term] == 0
    for other in {"align", "pixel", "img"} - {term}:  # the same views and model: the other terms are untouched
        assert off[other] == pytest.approx(full[other], rel=1e-5)
    assert off["total"] == pytest.approx(sum(off[k] for k in ("align", "pixel", "img")), rel=1e-6)


def test_no_pseudo_anomalies_gives_only_normal_views(tiny_model):
    views = make_views(tiny_model(pseudo_pixel=False, pseudo_latent=False, pseudo_prob=1.0), _shots(),
                       torch.Generator().manual_seed(0))
    assert views.label.sum() == 0 and views.mask.sum() == 0 and views.latent is None


def test_pixel_pseudo_anomalies_change_pixels_under_their_mask(tiny_model):
    shots = _shots()
    views = make_views(tiny_model(pseudo_latent=False, pseudo_prob=1.0, multiscale=False), shots,
                       torch.Generator().manual_seed(0))
    assert views.label.tolist() == [1, 1] and views.latent is None
    assert torch.equal((views.x != shots.pixels).any(1), views.mask.bool())


def test_latent_pseudo_anomalies_leave_pixels_and_mark_their_patches(tiny_model):
    shots = _shots()
    views = make_views(tiny_model(pseudo_pixel=False, pseudo_prob=1.0, multiscale=False), shots,
                       torch.Generator().manual_seed(0))
    assert torch.equal(views.x, shots.pixels) and views.label.tolist() == [1, 1]
    noised = views.latent.abs().sum(-1) > 0  # [V, HW] patches that get noise
    assert torch.equal(latent_mask_pixels(noised[0], (4, 4), 64).bool(), views.mask[0].bool())


def test_multiscale_adds_the_four_quadrant_views_with_their_prefixes(tiny_model):
    single = make_views(tiny_model(multiscale=False), _shots(), torch.Generator().manual_seed(0))
    assert single.x.shape[0] == 2 and single.scale.tolist() == [0, 0]
    multi = make_views(tiny_model(), _shots(), torch.Generator().manual_seed(0))
    assert multi.x.shape[0] == 10 and multi.scale.tolist() == [0, 0] + [1, 2, 3, 4] * 2
    assert multi.product_index.tolist() == [0, 1] + [0] * 4 + [1] * 4


def test_latent_noise_changes_only_marked_tokens_path(tiny_model):
    m = tiny_model(prompt_mode="none", fusion="bank", bank_layers=(4,))
    x = torch.randn(1, 3, 64, 64)
    clean = m.encode_image(x).bank[4]
    noise = torch.zeros(1, 16, 64)
    assert torch.equal(m.encode_image(x, latent_noise=noise).bank[4], clean)  # empty region: no-op
    noise[0, 5] = torch.randn(64)
    assert not torch.allclose(m.encode_image(x, latent_noise=noise).bank[4], clean)


def test_prefixes_1_to_N_are_unused_at_inference(tiny_model):
    m = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    enc, head = _forward(m, x)
    (head["logits"].sum() + enc.z0.sum()).backward()
    g = m.prefix.grad
    assert g[0].abs().sum() > 0 and torch.all(g[1:] == 0)
    # and scale s selects prefix c_s during training
    m.zero_grad()
    enc, head = _forward(m, x, scale=torch.tensor([3, 3]))
    head["logits"].sum().backward()
    assert m.prefix.grad[3].abs().sum() > 0 and torch.all(m.prefix.grad[[0, 1, 2, 4]] == 0)


def test_multiscale_training_costs_nothing_at_inference(tiny_model):
    """FLOPs of the inference forward: a model trained with the 4 quadrant views (and their prefixes)
    infers exactly like one trained on the global view alone; the prefix is 1 token in 1 + 16 + 8."""
    x = torch.randn(1, 3, 64, 64)

    def flops(model):
        with FlopCounterMode(display=False) as fc:
            model.encode_image(x)
        return fc.get_total_flops()

    multi, single = tiny_model(multiscale=True), tiny_model(multiscale=False)
    noprefix = tiny_model(multiscale=False, use_prefix=False)
    assert flops(multi) == flops(single)
    assert flops(noprefix) < flops(single) <= flops(noprefix) * 1.1


def test_losses_match_hand_computed_values():
    logits = torch.tensor([[0.0, 2.0]])
    target = torch.tensor([[0.0, 1.0]])
    p = torch.sigmoid(logits)
    # focal: -(1 - p_t)^2 log p_t with p_t = 0.5 and sigmoid(2)
    pt = torch.tensor([0.5, float(torch.sigmoid(torch.tensor(2.0)))])
    assert float(focal_loss(logits, target, 2.0)) == pytest.approx(float((-(1 - pt) ** 2 * pt.log()).mean()), rel=1e-6)
    # dice over the batch: 1 - (2 * sum(p t) + 1) / (sum p + sum t + 1)
    ref = 1 - (2 * p[0, 1] + 1) / (p.sum() + 1 + 1)
    assert float(dice_loss(logits, target)) == pytest.approx(float(ref), rel=1e-6)
    il = torch.tensor([[2.0, 0.0]])
    assert float(image_loss(il, torch.tensor([1]))) == pytest.approx(float(torch.log1p(torch.exp(torch.tensor(2.0)))), rel=1e-6)
    z, s = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert float(align_loss(z, s)) == pytest.approx(1 - 2 ** -0.5, rel=1e-6)
    assert float(align_loss(z, 3 * z)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_pseudo_anomaly_mask_is_exactly_the_changed_pixels(kind):
    for seed in range(5):
        img = torch.randn(3, 64, 64)
        out, mask = pixel_anomaly(img, kind, torch.Generator().manual_seed(seed))
        changed = (out != img).any(0)
        assert torch.equal(mask.bool(), changed) and changed.any()


def test_latent_region_mask_covers_its_patches():
    region = latent_region((4, 4), torch.Generator().manual_seed(0))
    pix = latent_mask_pixels(region, (4, 4), 64)
    assert pix.sum() == region.sum() * 16 * 16
    assert torch.equal(F.max_pool2d(pix[None, None], 16)[0, 0].flatten().bool(), region)
