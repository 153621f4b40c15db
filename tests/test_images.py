import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import (ImageDecodeError, decode_heatmap, decode_image, decode_mask, encode_heatmap,
                             resize_mask, to_model_input)


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


def test_mask_decode_and_resize_keep_exact_labels():
    m = np.zeros((20, 20), np.uint8)
    m[5:10, 5:10] = 255
    mask = decode_mask(_png(m))
    assert mask.sum() == 25
    assert resize_mask(mask, 40).sum() == 100
    assert decode_mask(None, (3, 4)).shape == (3, 4)


def test_heatmap_is_16bit_at_image_resolution_and_round_trips():
    amap = np.linspace(0, 0.3, 64 * 64, dtype=np.float32).reshape(64, 64)
    png, scale = encode_heatmap(amap, 64, 64)
    assert scale == pytest.approx(0.3)
    with Image.open(io.BytesIO(png)) as img:
        assert img.mode.startswith("I;16") or img.mode == "I"
        assert img.size == (64, 64)
    back = decode_heatmap(png, scale)
    assert np.abs(back - amap).max() <= scale / 65535
    png2, _ = encode_heatmap(amap, 90, 120)  # resized to the source image's own resolution
    assert decode_heatmap(png2, scale).shape == (90, 120)
