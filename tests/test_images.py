import io

import numpy as np
import pytest
from PIL import Image

from pipeline.sources.images import (HEATMAP_RANGE, ImageDecodeError, decode_heatmap, decode_image, decode_mask,
                                     encode_heatmap, heatmap_scale, heatmap_size, png16, resize_mask, to_model_input,
                                     to_model_pixels)


def _png(arr, mode=None, fmt="PNG"):
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format=fmt)
    return buf.getvalue()


def test_grayscale_rgba_and_16bit_decode_to_rgb8():
    gray = np.full((10, 12), 100, np.uint8)
    assert decode_image(_png(gray)).shape == (10, 12, 3)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # fully transparent pixel composites onto black
    out = decode_image(_png(rgba))
    assert out[1, 1].tolist() == [200, 0, 0] and out[0, 0].tolist() == [0, 0, 0]
    sixteen = np.full((6, 7), 65535, np.uint16)
    sixteen[0, 0] = 0
    out = decode_image(_png(sixteen))
    assert out.dtype == np.uint8 and out[1, 1, 0] == 255 and out[0, 0, 0] == 0


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "TIFF"])
def test_other_formats(fmt):
    rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    assert decode_image(_png(rgb, fmt=fmt)).shape == (16, 16, 3)


@pytest.mark.parametrize("data", [b"", b"not an image", None])
def test_corrupt_bytes_raise_a_readable_error(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_truncated_png_is_an_error_not_half_an_image():
    data = _png(np.zeros((64, 64, 3), np.uint8) + 7)
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_model_input_is_normalised_chw():
    x = to_model_input(np.zeros((30, 50, 3), np.uint8), 64)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    assert x[0, 0, 0] == pytest.approx(-0.48145466 / 0.26862954, rel=1e-5)


def test_uint8_pixels_normalised_on_the_actor_equal_the_float_model_input():
    from pipeline.model.scoring import model_input
    rgb = np.random.default_rng(4).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    u8 = to_model_pixels(rgb, 64)
    assert u8.dtype == np.uint8 and u8.shape == (3, 64, 64)
    want = to_model_input(rgb, 64)
    assert np.array_equal(model_input(u8[None], "cpu").numpy()[0], want)  # bit for bit: the same float ops
    assert np.array_equal(model_input(want[None], "cpu").numpy()[0], want)  # float input: already normalised


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (33, 65), (224, 224)])
def test_the_16bit_png_writer_is_read_exactly_by_pil(shape):
    q = np.random.default_rng(sum(shape)).integers(0, 65536, shape, dtype=np.uint16)  # noise: every byte varies
    q.flat[0], q.flat[-1] = 65535, 0
    png = png16(q, {"scale": "0.5", "decode": "v / 65535"})
    with Image.open(io.BytesIO(png)) as img:
        img.load()  # PIL checks every chunk's CRC while reading
        assert img.mode == "I;16" and img.size == shape[::-1]
        assert np.array_equal(np.asarray(img), q)
        assert img.text == {"anople:scale": "0.5", "anople:decode": "v / 65535"}


def test_mask_decode_and_resize_keep_exact_labels():
    m = np.zeros((20, 20), np.uint8)
    m[5:10, 5:10] = 255
    mask = decode_mask(_png(m))
    assert mask.sum() == 25
    assert resize_mask(mask, 40).sum() == 100
    assert decode_mask(None, (3, 4)).shape == (3, 4)


def test_heatmap_is_16bit_and_round_trips_on_a_fixed_scale():
    amap = np.linspace(0, 0.3, 64 * 64, dtype=np.float32).reshape(64, 64)
    scale = heatmap_scale(0.1, amap)
    assert scale == pytest.approx(HEATMAP_RANGE * 0.1)  # from the product's threshold, not from this map
    png = encode_heatmap(amap, 64, 64, scale)
    with Image.open(io.BytesIO(png)) as img:
        assert img.mode.startswith("I;16") or img.mode == "I"
        assert img.size == (64, 64)
        assert float(img.text["anople:scale"]) == pytest.approx(scale) and "65535" in img.text["anople:decode"]
    back = decode_heatmap(png)  # the scale travels in the PNG too
    assert np.abs(back - amap).max() <= scale / 65535


def test_two_maps_of_a_product_compare_by_value_and_saturate_above_the_scale():
    low, high = np.full((8, 8), 0.05, np.float32), np.full((8, 8), 0.2, np.float32)
    scale = heatmap_scale(0.1, low)
    assert heatmap_scale(0.1, high) == scale
    pix = [np.asarray(Image.open(io.BytesIO(encode_heatmap(m, 8, 8, scale)))) for m in (low, high)]
    assert abs(int(pix[1].max()) - 4 * int(pix[0].max())) <= 2  # 4x the anomaly, 4x the pixel value
    hot = encode_heatmap(np.full((8, 8), 9.0, np.float32), 8, 8, scale)
    assert decode_heatmap(hot).max() == pytest.approx(scale)  # above the scale: saturated, never wrapped
    assert heatmap_scale(float("nan"), high) == pytest.approx(0.2)  # no threshold: the map's own maximum


def test_heatmap_is_stored_at_a_bounded_side_and_decodes_to_the_image_size():
    amap = np.linspace(0, 0.3, 16 * 16, dtype=np.float32).reshape(16, 16)
    assert heatmap_size(900, 1200, 240) == (180, 240) and heatmap_size(90, 120, 240) == (90, 120)
    assert heatmap_size(900, 1200, None) == (900, 1200)
    png = encode_heatmap(amap, 900, 1200, 1.0, side=240)
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (240, 180) and img.text["anople:height"] == "900"
    full = decode_heatmap(png, size=(900, 1200))
    assert full.shape == (900, 1200)
    direct = decode_heatmap(encode_heatmap(amap, 900, 1200, 1.0))  # stored at full resolution
    assert np.abs(full - direct).mean() < 2e-3  # the bounded map upsamples to about the same map


def _png16_rgb(h, w):
    """A 48-bit RGB PNG (16 bits per channel), written by hand: PIL cannot write one."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + np.full((w, 3), 40000, ">u2").tobytes() for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _exif_rotated_jpeg():
    """Stored 64 wide x 40 high, EXIF orientation 6: every viewer shows it 40 wide x 64 high."""
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def _big_jpeg():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (1500, 2400, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


GOOD = {  # kind -> (bytes, the full size (H, W) in display orientation)
    "grayscale": (_png(np.full((10, 12), 100, np.uint8)), (10, 12)),
    "rgba": (_png(np.zeros((8, 9, 4), np.uint8)), (8, 9)),
    "palette": (_png(np.zeros((8, 8, 3), np.uint8), fmt="GIF"), (8, 8)),
    "16-bit gray": (_png(np.full((6, 7), 65535, np.uint16)), (6, 7)),
    "48-bit rgb": (_png16_rgb(5, 6), (5, 6)),
    "cmyk": (_png(np.zeros((8, 8, 4), np.uint8), mode="CMYK", fmt="JPEG"), (8, 8)),
    "exif-rotated": (_exif_rotated_jpeg(), (64, 40)),
    "very large": (_big_jpeg(), (1500, 2400)),
}
BAD = {  # kind -> (bytes, words the error row must carry)
    "truncated": (_png(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))[:3000],
                  "cannot decode image"),
    "zero-byte": (b"", "empty image bytes"),
    "not an image": (b"%PDF-1.4 a pdf", "cannot decode image"),
    "1x1": (_png(np.zeros((1, 1, 3), np.uint8)), "too small"),
}


def test_every_input_kind_gets_one_honest_row_from_the_decode_task(monkeypatch):
    from pipeline.sources.decoding import decode_batch

    def decode(kinds, data):
        return decode_batch({"image_id": np.array(kinds, dtype=object), "product": np.array(["p"] * len(kinds), dtype=object),
                             "image": np.array(data, dtype=object)}, 32, with_masks=False)

    kinds = list(GOOD) + list(BAD)
    out = decode(kinds, [GOOD[k][0] if k in GOOD else BAD[k][0] for k in kinds])
    assert len(out["status"]) == len(kinds)  # one row each, in order
    for i, k in enumerate(kinds):
        if k in GOOD:
            assert out["status"][i] == "ok", (k, out["error"][i])
            assert (int(out["height"][i]), int(out["width"][i])) == GOOD[k][1], k
            assert np.isfinite(out["pixels"][i]).all() and out["pixels"][i].shape == (3, 32, 32)
        else:
            assert out["status"][i] == "error" and BAD[k][1] in out["error"][i], (k, out["error"][i])
    # above PIL's bomb limit (where PIL only warns) formats without a reduced decode are refused; JPEG is not
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 64x64 = 4096 pixels: over it, under 2x
    over = decode(["png", "jpeg"], [_png(np.zeros((64, 64, 3), np.uint8)), _png(np.zeros((64, 64, 3), np.uint8), fmt="JPEG")])
    assert over["status"][0] == "error" and "over the 3000 pixel limit for PNG" in over["error"][0]
    assert over["status"][1] == "ok" and (int(over["height"][1]), int(over["width"][1])) == (64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64x64 image is then > 2x the limit: a "bomb"
    bomb = decode(["bomb"], [_png(np.zeros((64, 64, 3), np.uint8))])
    assert bomb["status"][0] == "error" and "DecompressionBomb" in bomb["error"][0]


def test_exif_orientation_is_applied_to_the_pixels():
    raw = np.asarray(Image.open(io.BytesIO(_exif_rotated_jpeg())))  # as stored: [40, 64]
    shown = decode_image(_exif_rotated_jpeg())
    assert raw.shape[:2] == (40, 64) and shown.shape[:2] == (64, 40)
    # orientation 6 = rotate 90 degrees clockwise for display: the stored top-left is shown top-right
    assert np.abs(shown.astype(int) - np.rot90(raw, k=-1).astype(int)).mean() < 1


def _tiff_with_a_broken_second_page() -> bytes:
    """A 16x16 red first page whose pointer to page 2 lies past the end of the file."""
    import struct
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="TIFF", save_all=True,
                                                   append_images=[Image.new("RGB", (1, 1))])
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    n = struct.unpack_from("<H", data, ifd)[0]
    struct.pack_into("<I", data, ifd + 2 + 12 * n, len(data) + 10**6)
    return bytes(data)


def test_a_multi_page_tiff_decodes_frame_0_without_walking_its_pages():
    """Counting pages walks them all (a 10^5-page file stalls a decode task): frame 0 is read where open() left it,
    so a file whose later pages are broken, or many, still decodes its first page."""
    rgb = decode_image(_tiff_with_a_broken_second_page())
    assert rgb.shape == (16, 16, 3) and tuple(rgb[0, 0]) == (200, 10, 10)


def test_per_image_byte_and_time_limits_are_error_rows_with_their_reason(monkeypatch):
    from PIL import ImageOps

    from pipeline.sources import images
    from pipeline.sources.decoding import decode_batch

    def decode(data):
        return decode_batch({"image_id": np.array(["a", "b"], dtype=object), "product": np.array(["p"] * 2, dtype=object),
                             "image": np.array(data, dtype=object)}, 32, with_masks=False)

    small, large = _png(np.zeros((8, 8, 3), np.uint8)), _png(np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                                                              dtype=np.uint8))
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", len(small) + 1)
    out = decode([small, large])
    assert list(out["status"]) == ["ok", "error"] and f"over the per-image limit of {len(small) + 1} bytes" in out["error"][1]
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 2**30)
    monkeypatch.setattr(images, "DECODE_SECONDS", 0.2)
    real = ImageOps.exif_transpose

    def stalls(img):  # a decode that never ends in Python (a hostile file's structure), on the second image only
        while img.size == (64, 64):
            pass
        return real(img)
    monkeypatch.setattr(images.ImageOps, "exif_transpose", stalls)
    out = decode([small, large])
    assert list(out["status"]) == ["ok", "error"] and "decode took over 0.2 s" in out["error"][1]
