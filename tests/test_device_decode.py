"""JPEG decode on the scoring actor's device (pipeline.sources.device_decode), run here on the CPU: the same code that
runs nvJPEG on a GPU (tests/gpu covers CUDA). What the decode task passes on, what the actor makes of it, and
that every row still gets one honest status."""
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.sources import images
from pipeline.sources.decoding import decode_batch
from pipeline.sources.device_decode import DeviceDecoder
from pipeline.sources.images import DEVICE_DECODE_MAX_PIXELS, decode_scaled, device_jpeg, to_model_pixels

S = 48


def _product(h, w, seed=0):
    """A smooth image with a few sharp shapes (what plants photograph), not noise: resampling filters agree
    on it the way they agree on real images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([120 + 80 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
    for _ in range(4):
        y, x, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, max(5, h // 6))
        img[max(0, y - r):y + r, max(0, x - r):x + r] = rng.integers(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(a, orientation=None, **kw):
    im = Image.fromarray(a)
    buf = io.BytesIO()
    if orientation is not None:
        exif = im.getexif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _cpu_pixels(data):
    rgb, _ = decode_scaled(data, S)
    return to_model_pixels(rgb, S)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_decode_shows_each_exif_orientation_as_pil_does(orientation):
    data = _jpeg(_product(60, 96), orientation)
    info = device_jpeg(data)
    assert info is not None
    o, (h, w) = info
    assert o == orientation and (h, w) == ((96, 60) if orientation >= 5 else (60, 96))  # display orientation
    got, errors = DeviceDecoder(S, "cpu")([data], [o], [(h, w)])
    assert errors == [None] and got.shape == (1, 3, S, S)
    # the CPU path decodes at reduced scale first (Image.draft) and resamples with PIL: a few grey levels apart
    diff = np.abs(got[0].numpy().astype(int) - _cpu_pixels(data).astype(int))
    assert diff.mean() < 3, diff.mean()
    if orientation > 1:  # the same bytes with EXIF ignored (what nvJPEG alone gives) are far off: the test can tell
        stored, _ = DeviceDecoder(S, "cpu")([data], [1], [(60, 96)])
        assert np.abs(stored[0].numpy().astype(int) - _cpu_pixels(data).astype(int)).mean() > 10


def test_only_complete_baseline_rgb_or_gray_jpegs_of_bounded_size_go_to_the_device(monkeypatch):
    a = _product(40, 40)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    full = _jpeg(a)
    assert device_jpeg(full) is not None
    assert device_jpeg(_jpeg(a[..., 0])) is not None  # grayscale: decoded to RGB
    assert device_jpeg(full + b"\x00" * 16) is not None  # padding after the end marker
    for name, data in {"png": buf.getvalue(), "progressive": _jpeg(a, progressive=True),
                       "cmyk": _cmyk_jpeg(), "truncated": full[:len(full) // 2], "empty": b"", "none": None,
                       "garbage after SOI": b"\xff\xd8\xff" + b"x" * 50 + b"\xff\xd9"}.items():
        assert device_jpeg(data) is None, name
    assert DEVICE_DECODE_MAX_PIXELS >= 4096 * 4096  # plants' 1024-4096 px images decode on the device
    monkeypatch.setattr(images, "DEVICE_DECODE_MAX_PIXELS", 40 * 40 - 1)  # over the bound: the CPU's reduced decode
    assert device_jpeg(full) is None


def _cmyk_jpeg():
    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), (10, 20, 30, 40)).save(buf, format="JPEG")
    return buf.getvalue()


def _batch(data):
    n = len(data)
    return {"image_id": np.array([f"i{k}" for k in range(n)], dtype=object),
            "product": np.array(["p"] * n, dtype=object), "image": np.array(data, dtype=object)}


def test_the_decode_task_passes_jpegs_on_as_bytes_and_decodes_the_rest_itself():
    a = _product(64, 80)
    png = io.BytesIO()
    Image.fromarray(a).save(png, format="PNG")
    data = [_jpeg(a), png.getvalue(), _cmyk_jpeg(), _jpeg(a)[:500], b"not an image", _jpeg(a, 6)]
    out = decode_batch(_batch(data), S, with_masks=False, on_device=True)
    assert "pixels" not in out and len(out["status"]) == len(data)
    assert list(out["status"]) == ["ok", "ok", "ok", "error", "error", "ok"]
    has_jpeg = [bool(len(j)) for j in out["jpeg"]]
    has_raw = [bool(len(r)) for r in out["raw"]]
    assert has_jpeg == [True, False, False, False, False, True]  # the truncated JPEG stays with the CPU: an error
    assert has_raw == [False, True, True, False, False, False]
    assert out["raw"][1] == to_model_pixels(a, S).tobytes()
    assert list(out["orientation"][[0, 5]]) == [1, 6]
    assert [tuple(int(v) for v in (out["height"][i], out["width"][i])) for i in (0, 1, 5)] == [(64, 80), (64, 80), (80, 64)]
    cpu = decode_batch(_batch(data), S, with_masks=False)  # the default, what every CPU night does
    assert list(cpu["status"]) == list(out["status"])
    assert [e.split(" at 0x")[0] for e in cpu["error"]] == [e.split(" at 0x")[0] for e in out["error"]]


def test_a_jpeg_the_device_rejects_is_decoded_by_pil_and_one_nothing_decodes_is_an_error(monkeypatch):
    import pipeline.sources.device_decode as dd
    good, bad = _jpeg(_product(64, 64)), _jpeg(_product(64, 64, seed=1))
    real = dd._decode_jpeg

    def picky(tensors, device):  # a device decoder that refuses one image (as nvJPEG refuses some encodings)
        if any(t.numel() == len(bad) and bytes(t.numpy()) == bad for t in tensors):
            raise RuntimeError("nvjpeg: unsupported encoding")
        return real(tensors, device)

    monkeypatch.setattr(dd, "_decode_jpeg", picky)
    dec = DeviceDecoder(S, "cpu")
    # a JPEG whose entropy-coded data is zeroed: header and end marker intact, so it reaches the actor
    broken = bad[:len(bad) // 2] + b"\x00" * (len(bad) // 2 - 2) + b"\xff\xd9"
    got, errors = dec([good, bad, broken], [1, 1, 1], [(64, 64)] * 3)
    assert errors[0] is None and errors[1] is None
    assert np.abs(got[1].numpy().astype(int) - _cpu_pixels(bad).astype(int)).max() == 0  # PIL's own pixels
    assert np.abs(got[0].numpy().astype(int) - _cpu_pixels(good).astype(int)).mean() < 3
    assert dec.fallbacks >= 1
    # damaged entropy-coded data: libjpeg (under PIL and under torchvision alike) fills it in rather than fail,
    # so the row fares as it does on the CPU path
    try:
        decode_scaled(broken, S)
        assert errors[2] is None
    except Exception as e:
        assert errors[2] == str(e)


def test_chunks_bound_the_decoded_bytes_held_at_once(monkeypatch):
    import pipeline.sources.device_decode as dd
    monkeypatch.setattr(dd, "CHUNK_BYTES", 3 * 64 * 64 * 2)  # two 64 x 64 images a chunk
    monkeypatch.setattr(dd, "RESIZE_GROUP", 1)  # and each resized alone
    seen = []
    real = dd._decode_jpeg
    monkeypatch.setattr(dd, "_decode_jpeg", lambda t, d: seen.append(len(t)) or real(t, d))
    data = [_jpeg(_product(64, 64, seed=k)) for k in range(5)]
    got, errors = DeviceDecoder(S, "cpu")(data, [1] * 5, [(64, 64)] * 5)
    assert seen == [2, 2, 1] and errors == [None] * 5
    for k in range(5):
        assert np.abs(got[k].numpy().astype(int) - _cpu_pixels(data[k]).astype(int)).mean() < 3


def test_a_device_that_decodes_nothing_is_given_up_once_and_pil_decodes_every_row(monkeypatch):
    import logging

    import pipeline.sources.device_decode as dd
    calls, records = [], []
    handler = logging.Handler()
    handler.emit = records.append
    dd.log.addHandler(handler)
    monkeypatch.setattr(dd.log, "level", logging.WARNING)

    def broken(tensors, device):  # e.g. a torchvision built without nvJPEG
        calls.append(len(tensors))
        raise RuntimeError("Not compiled with GPU support")

    monkeypatch.setattr(dd, "_decode_jpeg", broken)
    data = [_jpeg(_product(64, 64, seed=k)) for k in range(3)]
    dec = DeviceDecoder(S, "cpu")
    try:
        for _ in range(3):
            got, errors = dec(data, [1] * 3, [(64, 64)] * 3)
            assert errors == [None] * 3
            assert all((got[k].numpy() == _cpu_pixels(data[k])).all() for k in range(3))  # PIL's own pixels
    finally:
        dd.log.removeHandler(handler)
    assert calls == [3, 1, 1, 1] and dec.unusable == "RuntimeError: Not compiled with GPU support"
    assert sum("gave up" in r.getMessage() for r in records) == 1 and dec.fallbacks == 9
    assert len(records) <= 2 + DeviceDecoder.WARN_FIRST  # a night of such batches does not flood the log


def test_auto_decodes_on_the_actors_gpu_and_in_the_cpu_tasks_for_cpu_actors():
    from pipeline.sources.decoding import decode_where
    assert decode_where("auto", on_gpu=True) == "device"
    assert decode_where("auto", on_gpu=False) == "cpu"
    for explicit in ("cpu", "device"):  # an operator's choice stands on both kinds of node
        assert decode_where(explicit, on_gpu=True) == decode_where(explicit, on_gpu=False) == explicit
    with pytest.raises(ValueError, match="decode must be one of auto, cpu, device"):
        decode_where("gpu", on_gpu=True)
