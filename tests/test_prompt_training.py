"""Prompt learning: a checkpoint resumes to the same state; the YAML config; full-size backbone on CPU."""
import pytest
import torch

from pipeline.errors import UsageError
from pipeline.fitting.config import load_config
from pipeline.fitting.prompts import PromptTrainer, ShotBatch, cosine_lr, make_views, step_losses, train_prompts
from pipeline.fitting.weights import load_clip
from pipeline.model.anople import AnoPLe, build_tokenizer
from pipeline.model.backbone import create_clip, fingerprint
from pipeline.model.config import AnoPLeConfig

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
    log = train_prompts(model, _shots(), "cpu", checkpoints=ckpts, on_epoch=seen.append).epochs
    assert [m["epoch"] for m in log] == [1, 2] and seen == log
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]
    assert all(m["epoch_seconds"] > 0 and m["loss_total"] > 0 for m in log)
    again = tiny_model(epochs=2, batch_shots=2)
    assert train_prompts(again, _shots(), "cpu", checkpoints=ckpts).epochs == []  # done: nothing left to train
    a, b = model.prompt_state(), again.prompt_state()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the checkpoint's prompts, exactly
    fresh = tiny_model(epochs=2, batch_shots=2)
    assert len(train_prompts(fresh, _shots(), "cpu", checkpoints=ckpts, restart=True).epochs) == 2


KNOBS = dict(epochs=2, steps_per_epoch=3, batch_shots=2, pseudo_prob=1.0)  # every view perturbed: all losses work


def _fit_prompts(rank: int, world: int, init: str, out: str) -> None:
    """One data-parallel worker (rank of world) over a gloo group, as Ray Train's workers are: trains the tiny
    model's prompts and writes rank 0's prompts and epoch metrics to `out`."""
    import torch.distributed as dist

    from pipeline.model.backbone import create_clip
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = AnoPLe(create_clip("anople-tiny-vit", "random", seed=0), AnoPLeConfig(**KNOBS),
                   build_tokenizer("anople-tiny-vit")).eval()
    log = train_prompts(model, _shots(), "cpu", rank=rank, world=world).epochs
    if rank == 0:
        torch.save({"prompts": model.prompt_state(), "log": log}, out)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_workers_train_the_prompts_one_worker_trains(tmp_path, world):
    """Issue 24, item 6: W workers (2: 5 views each; 3: an uneven 4/3/3 split of a step's 10 views) end with one
    worker's prompts and report its losses. Before, each worker trained on every W-th shot with its own draws,
    which is another training run altogether."""
    import torch.multiprocessing as mp
    _fit_prompts(0, 1, "", str(tmp_path / "one.pt"))
    mp.spawn(_fit_prompts, args=(world, f"file://{tmp_path}/rendezvous", str(tmp_path / "many.pt")), nprocs=world)
    one, many = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "many.pt"))
    assert one["prompts"].keys() == many["prompts"].keys()
    for k, a in one["prompts"].items():
        # float tolerance under Adam: a weight whose gradient is ~0 moves by up to lr a step on the rounding of
        # the sum over workers (g / sqrt(v) of noise), so single elements differ by ~1e-4 after 6 steps; the
        # tensors as a whole agree to ~1e-5 of their norm
        assert float((a - many["prompts"][k]).norm()) <= 1e-3 * float(a.norm()) + 1e-6, k
        steps = KNOBS["epochs"] * KNOBS["steps_per_epoch"]
        assert float((a - many["prompts"][k]).abs().max()) <= steps * AnoPLeConfig().lr, k
    fresh = AnoPLe(create_clip("anople-tiny-vit", "random", seed=0), AnoPLeConfig(**KNOBS),
                   build_tokenizer("anople-tiny-vit")).prompt_state()
    assert any(not torch.allclose(fresh[k], one["prompts"][k]) for k in fresh)  # training moved them at all
    for a, b in zip(one["log"], many["log"]):
        for k in ("loss_pixel", "loss_img", "loss_align", "loss_total"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), k


def test_more_workers_than_a_steps_views_is_refused(tiny_model):
    model = tiny_model(batch_shots=1, multiscale=False)
    with pytest.raises(UsageError, match="1 views .* cannot feed 2 workers"):
        PromptTrainer(model, _shots(), "cpu", world=2)


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


@pytest.mark.parametrize("n_shots,batch_shots", [(1, 4), (4, 3), (4, 8)])
def test_the_budget_is_optimiser_steps_whatever_the_number_of_shots(tiny_model, n_shots, batch_shots):
    """An epoch is steps_per_epoch steps of batch_shots shots each: one shot fills its batch with copies
    (each gets its own pseudo-anomaly draw), a large pool is drawn without repeats. The learning rate
    decays over the steps, not the epochs."""
    shots = _shots().rows(slice(0, n_shots))
    trainer = PromptTrainer(tiny_model(epochs=2, steps_per_epoch=3, batch_shots=batch_shots), shots, "cpu")
    drawn, lrs = [], []
    draw, step = trainer.draw, trainer.opt.step
    trainer.draw = lambda: drawn.append(draw()) or drawn[-1]
    trainer.opt.step = lambda *a, **k: (lrs.append(trainer.opt.param_groups[0]["lr"]), step(*a, **k))[1]
    trainer.run_epoch()
    trainer.run_epoch()
    assert len(lrs) == 6 and all(len(d) == batch_shots for d in drawn)
    for d in drawn:
        counts = torch.bincount(d, minlength=n_shots)
        assert counts.max() - counts.min() <= 1  # every shot about equally often, no shot left out needlessly
    cfg = trainer.model.cfg
    assert lrs == pytest.approx([cosine_lr(i, 6, cfg.lr, cfg.lr_min) for i in range(6)])


def _scripted(values):
    """A validate() that returns the next scripted fused AUROC each call (epoch 0 first)."""
    it = iter(values)
    return lambda: {"bank_pixel_auroc": 0.5, "fused_pixel_auroc": next(it)}


def test_training_keeps_the_best_epoch_and_stops_when_validation_stops_improving(tiny_model, tmp_path):
    kept = {}
    model = tiny_model(epochs=10, steps_per_epoch=1, batch_shots=2, patience=2)
    log = train_prompts(model, _shots(), "cpu", checkpoints=str(tmp_path / "c"), validate=_scripted(
        [0.50, 0.60, 0.70, 0.69, 0.70, 0.9, 0.9]),
        on_epoch=lambda m: kept.setdefault(m["epoch"], {k: v.clone() for k, v in model.prompt_state().items()}))
    # epochs 3 and 4 bring no gain over epoch 2 (0.70 is not more than 0.70 + 1e-3): stop after epoch 4
    assert [m["epoch"] for m in log.epochs] == [1, 2, 3, 4] and log.val.stopped
    assert (log.val.best_epoch, log.val.best, log.val.baseline["fused_pixel_auroc"]) == (2, 0.70, 0.50)
    assert [m["val_best_epoch"] for m in log.epochs] == [1, 2, 2, 2]
    now = model.prompt_state()
    assert all(torch.equal(now[k], kept[2][k]) for k in now)  # epoch 2's prompts, not the last epoch's
    assert not all(torch.equal(now[k], kept[4][k]) for k in now)
    # a rerun resumes the record from the checkpoint: nothing to train, the same best prompts
    again = tiny_model(epochs=10, steps_per_epoch=1, batch_shots=2, patience=2)
    log2 = train_prompts(again, _shots(), "cpu", checkpoints=str(tmp_path / "c"), validate=_scripted([]))
    assert log2.epochs == [] and log2.val.best_epoch == 2
    assert all(torch.equal(again.prompt_state()[k], now[k]) for k in now)


def test_an_epoch_that_never_beats_the_untrained_model_leaves_it_untrained(tiny_model):
    model = tiny_model(epochs=3, steps_per_epoch=1, batch_shots=2, patience=0)
    before = {k: v.clone() for k, v in model.prompt_state().items()}
    log = train_prompts(model, _shots(), "cpu", validate=_scripted([0.8, 0.7, 0.6, 0.75]))
    assert len(log.epochs) == 3 and not log.val.stopped and log.val.best_epoch == 0  # patience 0: all epochs
    assert all(torch.equal(model.prompt_state()[k], before[k]) for k in before)


def test_the_shipped_default_yaml_is_the_config_default():
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "infra" / "configs" / "anople-default.yaml"
    assert load_config(str(path)) == AnoPLeConfig()
