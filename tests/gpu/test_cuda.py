"""The CUDA paths (torch-cuda bank search, bf16 scoring, mixed-precision prompt training).

Skipped where there is no GPU (CI never has one). On a GPU machine, without the S3/moto fixtures:
    HF_HUB_OFFLINE=1 python -m pytest --noconftest -q tests/gpu
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.fitting.bank import MemoryBank, pick_backend  # noqa: E402
from pipeline.fitting.prompts import PromptTrainer, ShotBatch  # noqa: E402
from pipeline.model.anople import AnoPLe, build_tokenizer  # noqa: E402
from pipeline.model.backbone import create_clip  # noqa: E402
from pipeline.model.config import AnoPLeConfig  # noqa: E402
from pipeline.model.scoring import encode  # noqa: E402
from pipeline.nightly.scorer import Scorer  # noqa: E402

TINY = "anople-tiny-vit"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _unit(rng, n, c):
    x = rng.normal(size=(n, c)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_gpu_picks_a_gpu_backend_and_it_matches_faiss_cpu():
    assert pick_backend("cuda") in ("faiss-gpu", "torch-cuda")
    rng = np.random.default_rng(0)
    layers = [_unit(rng, 4000, 640), _unit(rng, 4000, 640)]
    q = [torch.from_numpy(_unit(rng, 700, 640)) for _ in layers]
    ref = MemoryBank(layers, "faiss-cpu").distance(q).numpy()
    got = MemoryBank(layers, pick_backend("cuda")).distance([x.cuda() for x in q]).cpu().numpy()
    assert np.abs(got - ref).max() < 1e-3  # fp16 matmul on the GPU: ~1e-3 relative on cosines


def _model(device, seed=0):
    clip = create_clip(TINY, "random", seed=0)
    return AnoPLe(clip, AnoPLeConfig(seed=seed, epochs=2), build_tokenizer(TINY)).to(device).eval()


def test_bf16_scoring_on_gpu_agrees_with_float32_on_cpu():
    rng = np.random.default_rng(1)
    shots = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
    x = rng.normal(size=(6, 3, 64, 64)).astype(np.float32)
    products = ["tile", "washer"] * 3
    out = {}
    for device in ("cpu", "cuda"):
        model = _model(device)
        feats = [f.cpu().numpy() for f in model.bank_features(encode(model, shots, device))]
        banks = {p: MemoryBank([f[i] for f in feats], pick_backend(device)) for i, p in enumerate(["tile", "washer"])}
        out[device] = Scorer(model, banks, device).score(x, products)
    (s_cpu, m_cpu), (s_gpu, m_gpu) = out["cpu"], out["cuda"]
    assert m_gpu.shape == m_cpu.shape and m_gpu.dtype == np.float32
    corr = np.corrcoef(m_cpu.ravel(), m_gpu.ravel())[0, 1]
    assert corr > 0.98, corr  # same maps up to bf16 rounding in the backbone
    assert np.allclose(s_gpu, s_cpu, rtol=0.05), (s_cpu, s_gpu)


def test_mixed_precision_prompt_training_on_gpu_moves_prompts_and_keeps_them_float32():
    model = _model("cuda")
    model.train()
    before = {k: v.clone() for k, v in model.prompt_state().items()}
    shots = ShotBatch(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)),
                      torch.tensor([0, 0, 1, 1]), ["tile", "washer"])
    trainer = PromptTrainer(model, shots, "cuda", batch_size=2, amp=True)
    assert trainer.amp
    for _ in range(2):
        log = trainer.run_epoch()
    assert all(np.isfinite(v) for k, v in log.items() if k.startswith("loss_")), log
    after = model.prompt_state()
    assert all(t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_nvjpeg_decode_on_the_gpu_gives_the_cpu_decoders_pixels():
    """The scoring actor's device decode (device_decode) on CUDA, batched, sizes and EXIF orientations mixed,
    against the same code on the CPU (libjpeg) and against PIL's path (what CPU decode tasks send)."""
    import io

    from PIL import Image

    from pipeline.sources.device_decode import DeviceDecoder
    from pipeline.sources.images import decode_scaled, device_jpeg, to_model_pixels

    rng = np.random.default_rng(2)
    data = []
    for k, (h, w) in enumerate([(1024, 1024), (1024, 1024), (600, 800), (1024, 1024), (480, 640)]):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        a = np.stack([120 + 80 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1).astype(np.uint8)
        a[rng.integers(0, h // 2):, rng.integers(0, w // 2):][:40, :40] = 250
        im, buf = Image.fromarray(a), io.BytesIO()
        exif = im.getexif()
        exif[0x0112] = (1, 6, 3, 8, 1)[k]
        im.save(buf, format="JPEG", quality=90, exif=exif)
        data.append(buf.getvalue())
    info = [device_jpeg(d) for d in data]
    args = ([o for o, _ in info], [s for _, s in info])
    gpu, gerr = DeviceDecoder(240, "cuda")(data, *args)
    cpu, cerr = DeviceDecoder(240, "cpu")(data, *args)
    assert gerr == cerr == [None] * len(data) and gpu.device.type == "cuda"
    assert (gpu.cpu().int() - cpu.int()).abs().float().mean() < 1.5  # nvJPEG's IDCT vs libjpeg's
    pil = np.stack([to_model_pixels(decode_scaled(d, 240)[0], 240) for d in data])
    assert np.abs(gpu.cpu().numpy().astype(int) - pil.astype(int)).mean() < 3
