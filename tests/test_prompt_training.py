"""Prompt learning: a checkpoint resumes to the same state; the YAML config; full-size backbone on CPU."""
import pytest
import torch

from pipeline.config import load_config
from pipeline.model.anople import AnoPLe, build_tokenizer
from pipeline.model.backbone import create_clip, fingerprint
from pipeline.model.config import AnoPLeConfig
from pipeline.prompt_training import PromptTrainer, ShotBatch, step_losses, make_views
from pipeline.weights import load_clip
from tests.conftest import TINY

PRODUCTS = ["tile", "washer"]


def _trainer(clip, epochs=3):
    model = AnoPLe(clip, AnoPLeConfig(epochs=epochs), build_tokenizer(TINY))
    shots = ShotBatch(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5)),
                      torch.tensor([0, 0, 1, 1]), PRODUCTS)
    return PromptTrainer(model, shots, "cpu", batch_size=2)


def test_checkpoint_resumes_to_the_same_state():
    clip = create_clip(TINY, "random", seed=0)
    straight = _trainer(clip)
    for _ in range(3):
        straight.run_epoch()
    first = _trainer(clip)
    first.run_epoch()
    blob = first.state_bytes()
    resumed = _trainer(clip)  # a fresh process: new model, optimiser and RNG
    resumed.load_state_bytes(blob)
    assert resumed.epoch == 1
    for _ in range(2):
        resumed.run_epoch()
    a, b = straight.model.prompt_state(), resumed.model.prompt_state()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # and training moved the prompts at all
    fresh = _trainer(clip).model.prompt_state()
    assert any(not torch.allclose(fresh[k], a[k]) for k in a)


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prompt_mode: t2i\nepochs: 7\ndecoder_layers: [2, 4]\nuse_align_loss: false\n")
    cfg = load_config(str(path), epochs=3)
    assert (cfg.prompt_mode, cfg.epochs, cfg.decoder_layers, cfg.use_align_loss) == ("t2i", 3, (2, 4), False)
    path.write_text("prompt_mod: bi\n")
    with pytest.raises(ValueError, match="unknown AnoPLe config keys: prompt_mod"):
        load_config(str(path))
    with pytest.raises(ValueError):
        AnoPLeConfig(prompt_mode="none", fusion="harmonic")
    assert AnoPLeConfig.from_dict(cfg.to_dict()) == cfg


def test_full_size_backbone_from_a_checkpoint_file_forward_and_backward_on_cpu(tmp_path):
    """ViT-B-16-plus-240, random init saved to a file, loaded by path: 240 px, batch 2, fwd + bwd."""
    src = create_clip("ViT-B-16-plus-240", "random", seed=0)
    path = tmp_path / "vit_b_16_plus_240.pt"
    torch.save(src.state_dict(), path)
    fp = fingerprint(src)
    del src
    clip = load_clip("ViT-B-16-plus-240", str(path))
    assert fingerprint(clip) == fp
    model = AnoPLe(clip, AnoPLeConfig(multiscale=False), build_tokenizer("ViT-B-16-plus-240"))
    assert (model.image_size, model.grid, model.J, model.bank_layers, model.decoder_layers) == (
        240, (15, 15), 9, (3, 8), (6, 9, 12))
    shots = ShotBatch(torch.randn(2, 3, 240, 240), torch.tensor([0, 1]), PRODUCTS)
    losses = step_losses(model, *make_views(model, shots, torch.Generator().manual_seed(0)), PRODUCTS)
    losses["total"].backward()
    assert torch.isfinite(losses["total"])
    assert model.visual_ctx.grad is not None and all(p.grad is None for p in model.clip.parameters())


@pytest.mark.parametrize("batch_shots,steps", [(1, 4), (3, 2), (8, 1)])
def test_batch_shots_sets_the_optimiser_steps_per_epoch(batch_shots, steps):
    clip = create_clip(TINY, "random", seed=0)
    model = AnoPLe(clip, AnoPLeConfig(epochs=1, batch_shots=batch_shots), build_tokenizer(TINY))
    shots = ShotBatch(torch.randn(4, 3, 64, 64), torch.tensor([0, 0, 1, 1]), PRODUCTS)
    trainer = PromptTrainer(model, shots, "cpu")
    calls = []
    step = trainer.opt.step
    trainer.opt.step = lambda *a, **k: (calls.append(1), step(*a, **k))[1]
    trainer.run_epoch()
    assert len(calls) == steps
