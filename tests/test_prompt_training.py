"""Prompt learning: a checkpoint resumes to the same state; the YAML config; full-size backbone on CPU."""
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import UsageError
from pipeline.model.anople import AnoPLe, build_tokenizer
from pipeline.model.backbone import create_clip, fingerprint
from pipeline.model.config import AnoPLeConfig
from pipeline.prompt_training import PromptTrainer, ShotBatch, cosine_lr, make_views, step_losses, train_prompts
from pipeline.weights import load_clip

PRODUCTS = ["tile", "washer"]


def _shots():
    return ShotBatch(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5)),
                     torch.tensor([0, 0, 1, 1]), PRODUCTS)


def _trainer(tiny_model, epochs=3):
    return PromptTrainer(tiny_model(epochs=epochs), _shots(), "cpu", batch_size=2)


def test_checkpoint_resumes_to_the_same_state(tiny_model):
    straight = _trainer(tiny_model)
    for _ in range(3):
        straight.run_epoch()
    first = _trainer(tiny_model)
    first.run_epoch()
    blob = first.state_bytes()
    resumed = _trainer(tiny_model)  # a fresh process: new model, optimiser and RNG
    resumed.load_state_bytes(blob)
    assert resumed.epoch == 1
    for _ in range(2):
        resumed.run_epoch()
    a, b = straight.model.prompt_state(), resumed.model.prompt_state()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # and training moved the prompts at all
    fresh = _trainer(tiny_model).model.prompt_state()
    assert any(not torch.allclose(fresh[k], a[k]) for k in a)


def test_train_prompts_checkpoints_every_epoch_and_a_rerun_resumes(tiny_model, tmp_path):
    ckpts = str(tmp_path / "ckpts")
    seen = []
    model = tiny_model(epochs=2, batch_shots=2)
    log = train_prompts(model, _shots(), "cpu", checkpoints=ckpts, on_epoch=seen.append)
    assert [m["epoch"] for m in log] == [1, 2] and seen == log
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]
    assert all(m["epoch_seconds"] > 0 and m["loss_total"] > 0 for m in log)
    again = tiny_model(epochs=2, batch_shots=2)
    assert train_prompts(again, _shots(), "cpu", checkpoints=ckpts) == []  # done: nothing left to train
    a, b = model.prompt_state(), again.prompt_state()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the checkpoint's prompts, exactly
    fresh = tiny_model(epochs=2, batch_shots=2)
    assert len(train_prompts(fresh, _shots(), "cpu", checkpoints=ckpts, restart=True)) == 2


def test_data_parallel_shards_take_every_world_th_shot():
    shots = _shots()
    parts = [shots.shard(r, 2) for r in range(2)]
    assert torch.equal(parts[0].pixels, shots.pixels[0::2]) and parts[1].product_index.tolist() == [0, 1]
    with pytest.raises(UsageError, match="cannot feed 5 workers"):
        shots.shard(0, 5)


def test_cosine_schedule_ends_at_its_floor():
    assert cosine_lr(0, 10, 0.1, 0.001) == pytest.approx(0.1)
    assert cosine_lr(5, 10, 0.1, 0.001) == pytest.approx(0.0505)
    assert cosine_lr(10, 10, 0.1, 0.001) == cosine_lr(99, 10, 0.1, 0.001) == pytest.approx(0.001)


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prompt_mode: t2i\nepochs: 7\ndecoder_layers: [2, 4]\nuse_align_loss: false\n")
    cfg = load_config(str(path), epochs=3)
    assert (cfg.prompt_mode, cfg.epochs, cfg.decoder_layers, cfg.use_align_loss) == ("t2i", 3, (2, 4), False)
    path.write_text("prompt_mod: bi\n")
    with pytest.raises(UsageError, match="unknown AnoPLe config keys: prompt_mod"):
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
    losses = step_losses(model, make_views(model, shots, torch.Generator().manual_seed(0)), PRODUCTS)
    losses["total"].backward()
    assert torch.isfinite(losses["total"])
    assert model.visual_ctx.grad is not None and all(p.grad is None for p in model.clip.parameters())


@pytest.mark.parametrize("batch_shots,steps", [(1, 4), (3, 2), (8, 1)])
def test_batch_shots_sets_the_optimiser_steps_per_epoch(tiny_model, batch_shots, steps):
    trainer = PromptTrainer(tiny_model(epochs=1, batch_shots=batch_shots), _shots(), "cpu")
    calls = []
    step = trainer.opt.step
    trainer.opt.step = lambda *a, **k: (calls.append(1), step(*a, **k))[1]
    trainer.run_epoch()
    assert len(calls) == steps
