import os

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.anomaly_map import gaussian_kernel, harmonic_fusion, image_score, patch_scores_to_map
from pipeline.model.backbone import BackboneLoadError, create_clip, fingerprint
from tests.conftest import TINY


def test_bank_features_shapes_unit_norm_and_equal_to_open_clips_own_intermediates(tiny_clip, tiny_model):
    clip = tiny_clip
    model = tiny_model(prompt_mode="none", fusion="bank", bank_layers=(2, 4))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        feats = model.bank_features(model.encode_image(x))
        ref = clip.visual.forward_intermediates(x, indices=[1, 3], intermediates_only=True)["image_intermediates"]
    assert [tuple(f.shape) for f in feats] == [(3, 16, 64), (3, 16, 64)]  # 4x4 patches, width 64
    assert torch.allclose(feats[0].norm(dim=-1), torch.ones(3, 16), atol=1e-5)
    for f, r in zip(feats, ref):  # our own block loop == open_clip's, when nothing is prompted
        r = torch.nn.functional.normalize(r.flatten(2).transpose(1, 2), dim=-1)
        assert torch.allclose(f, r, atol=1e-5)
    assert not any(p.requires_grad for p in clip.parameters())  # frozen


def test_random_init_is_seeded_and_fingerprinted():
    a, b, c = (create_clip(TINY, "random", seed=s) for s in (0, 0, 1))
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_fingerprint_does_not_depend_on_thread_count():
    # Ray workers run 1 thread, drivers several: a float sum's rounding used to differ between them
    clip = create_clip(TINY, "random", seed=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fingerprint(clip)
        torch.set_num_threads(4)
        assert fingerprint(clip) == one
    finally:
        torch.set_num_threads(threads)


def test_local_checkpoint_file_loads_by_path(tmp_path):
    src = create_clip(TINY, "random", seed=3)
    path = tmp_path / "weights.pt"
    torch.save(src.state_dict(), path)
    loaded = create_clip(TINY, str(path))
    assert fingerprint(loaded) == fingerprint(src)


def test_unfetchable_hub_tag_is_an_error_not_a_fallback():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(BackboneLoadError, match="cannot load weights 'laion400m_e32'"):
        create_clip("ViT-B-16-plus-240", "laion400m_e32")
    with pytest.raises(BackboneLoadError, match="unknown open_clip architecture"):
        create_clip("no-such-arch", "random")


def test_bank_layers_default_and_validation(tiny_model):
    assert tiny_model(prompt_mode="none", fusion="bank").bank_layers == (1, 3)  # PromptAD's 3 and 8 of 12, on 4 blocks
    with pytest.raises(ValueError):
        tiny_model(prompt_mode="none", fusion="bank", bank_layers=(5,))


def test_anomaly_map_upsamples_blurs_and_scores():
    patch = torch.zeros(2, 16)
    patch[1, 5] = 1.0
    amap = patch_scores_to_map(patch, (4, 4), 64, sigma=4.0)
    assert amap.shape == (2, 64, 64)
    assert float(image_score(amap)[0]) == 0.0 and float(image_score(amap)[1]) > 0
    assert float(gaussian_kernel(4.0).sum()) == pytest.approx(1.0)
    a, b = torch.tensor([0.2, 0.0]), torch.tensor([0.6, 0.5])
    assert harmonic_fusion(a, b).tolist() == pytest.approx([0.3, 0.0])


@pytest.mark.parametrize("shape,sigma", [((3, 64, 64), 4.0), ((2, 40, 56), 2.5), ((1, 9, 9), 4.0)])
def test_blur_is_the_replicate_padded_separable_gaussian(shape, sigma):
    from pipeline.model.anomaly_map import blur
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
    k = gaussian_kernel(sigma)
    r = k.numel() // 2
    ref = x.unsqueeze(1)  # the definition: pad each axis by repeating its edge, then a 1-D convolution
    ref = F.conv2d(F.pad(ref, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    ref = F.conv2d(F.pad(ref, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))[:, 0]
    assert torch.allclose(blur(x, sigma), ref, atol=1e-6)
    assert torch.equal(blur(x, 0), x)


def test_an_untrained_backbone_is_recognised_by_its_weights_not_its_name(tmp_path, tiny_clip):
    from pipeline.model.backbone import looks_untrained
    assert looks_untrained(tiny_clip) and looks_untrained(create_clip(TINY, "random", seed=9))
    path = tmp_path / "random.pt"
    torch.save(tiny_clip.state_dict(), path)  # a random init saved as if it were a checkpoint
    assert looks_untrained(create_clip(TINY, str(path)))
    trained = create_clip(TINY, str(path))
    with torch.no_grad():
        trained.ln_final.weight.mul_(1.01)  # training moves every LayerNorm; one is enough to tell
    assert not looks_untrained(trained)
