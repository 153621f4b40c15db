"""Image bytes -> arrays. Any format PIL reads; grayscale, palette, RGBA, CMYK and 16-bit are valid input.

Kept free of torch so that Ray's CPU decode tasks stay light.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import struct
import threading
import time
import zlib

import numpy as np
from PIL import Image, ImageFile, ImageOps

from pipeline.model import config

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image

CLIP_MEAN = np.array(config.CLIP_MEAN, dtype=np.float32)  # [3]
CLIP_STD = np.array(config.CLIP_STD, dtype=np.float32)  # [3]


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read; the message says why."""


# Per-image limits, each an error row with its reason, never a stalled or OOM-killed decode task: the encoded size
# (a plant's largest line-scan TIFFs are tens of MB) and the wall time of one decode (a hostile file's structure,
# e.g. 10^6 pages or a pathological zlib stream, whatever its pixel count).
MAX_IMAGE_BYTES = int(os.environ.get("ANOPLE_MAX_IMAGE_BYTES", 256 * 2**20))
DECODE_SECONDS = float(os.environ.get("ANOPLE_DECODE_SECONDS", 60))


@contextlib.contextmanager
def decode_deadline(seconds: float | None = None):
    """Raise ImageDecodeError in the block after `seconds` (default DECODE_SECONDS) of wall time (SIGALRM; the main thread only, where
    Ray runs its tasks: elsewhere the block runs unbounded). Python-level work (PIL's TIFF page walk, its
    plugins) is interrupted between bytecodes; one C call runs to its end first, bounded by the pixel limits."""
    seconds = DECODE_SECONDS if seconds is None else seconds
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise ImageDecodeError(f"decode took over {seconds:g} s (ANOPLE_DECODE_SECONDS)")
    previous = signal.signal(signal.SIGALRM, expired)
    t0 = time.monotonic()
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # someone else's timer (a test runner's timeout) was running: it goes on, less the time spent
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - t0), 1e-3), interval)


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3]. 16/32-bit and float images are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float32)  # float32: 4 bytes a pixel on the largest images
        if img.mode.startswith("I;16"):
            a = a / 65535.0
        else:  # 32-bit int or float: scale by the image's own range (no fixed white point exists)
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        g = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent pixels composite onto black
        img = Image.alpha_composite(bg, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def decode_scaled(data: bytes | None, side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded bytes -> (uint8 RGB [h, w, 3], (H, W) of the full image), both in display orientation (EXIF
    orientation applied, as every image viewer shows it). With `side`, a JPEG is decoded at a reduced scale
    in the DCT domain (Image.draft: at least `side` pixels per side), so a large image costs memory and time
    for what the model sees, not for its full size. Raises ImageDecodeError with a readable reason."""
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty image bytes")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageDecodeError(f"image of {len(data)} bytes is over the per-image limit of {MAX_IMAGE_BYTES} bytes "
                               "(ANOPLE_MAX_IMAGE_BYTES)")
    try:
        # open() reads the header only; PIL refuses > 2x its bomb limit. The whole decode runs under the deadline.
        with decode_deadline(), Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if side and img.format == "JPEG":
                img.draft("RGB", (side, side))
            elif w * h > Image.MAX_IMAGE_PIXELS:
                # PNG, TIFF, BMP... have no reduced decode: above PIL's bomb limit (where it only warns) the
                # full-size decode would cost GBs per decode task, so the row is an error, not an OOM
                raise ImageDecodeError(
                    f"image of {w}x{h} pixels is over the {Image.MAX_IMAGE_PIXELS} pixel limit for {img.format} "
                    "(decoded at full size; only JPEG decodes at reduced size)")
            # multi-page TIFF, animated GIF/PNG: the image is frame 0, where open() leaves it. Never ask n_frames:
            # counting a TIFF's pages walks all of them (and checks each page pointer against every page seen),
            # so a file of 10^5 empty pages would hold a decode task for minutes
            img.load()
            orientation = img.getexif().get(0x0112, 1)
            rgb = _to_rgb8(ImageOps.exif_transpose(img))
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {type(e).__name__}: {e}") from e
    if orientation in _TRANSPOSED:
        h, w = w, h
    if rgb.ndim != 3 or min(h, w, *rgb.shape[:2]) < 2:
        raise ImageDecodeError(f"image too small to score: {w}x{h} pixels")
    return rgb, (h, w)


# The largest JPEG the scoring actor decodes on its device (full size there: nvJPEG has no DCT-domain downscale):
# 25 MP is 75 MB of RGB on the GPU. Larger ones take the CPU's reduced decode (Image.draft), bounded by `side`.
DEVICE_DECODE_MAX_PIXELS = 5000 * 5000


def device_jpeg(data: bytes | None) -> tuple[int, tuple[int, int]] | None:
    """Whether the scoring actor can decode these bytes on its device (decoding.decode_batch's `on_device`):
    (EXIF orientation, (H, W) in display orientation) for a complete baseline JPEG, RGB or grayscale, of at most
    DEVICE_DECODE_MAX_PIXELS; None for anything else, which the CPU decodes as always (PNG, TIFF..., CMYK and
    progressive JPEGs, huge ones, and bytes that do not end in the JPEG end marker: a truncated file must stay an
    error, never half an image, whatever a device decoder would make of it). Reads the header only."""
    if not data or data[:3] != b"\xff\xd8\xff" or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.info.get("progressive") \
                    or img.info.get("progression"):
                return None
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception:  # whatever PIL cannot even parse, the CPU decode reports in its own words
        return None
    if w * h > DEVICE_DECODE_MAX_PIXELS or min(w, h) < 2:
        return None
    orientation = orientation if orientation in range(1, 9) else 1  # as ImageOps.exif_transpose: unknown -> none
    return orientation, ((w, h) if orientation in _TRANSPOSED else (h, w))


def decode_image(data: bytes | None) -> np.ndarray:
    """Encoded bytes -> uint8 RGB [H, W, 3] at full resolution, in display orientation."""
    return decode_scaled(data)[0]


def decode_mask(data: bytes | None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Mask bytes -> bool [H, W] (any non-zero pixel is defect). None -> all-normal mask of `shape`."""
    if data is None:
        if shape is None:
            raise ValueError("no mask and no shape to build an empty one")
        return np.zeros(shape, dtype=bool)
    with Image.open(io.BytesIO(data)) as m:
        a = np.asarray(m)
    if a.ndim == 3:
        a = a[..., :3].max(axis=2)
    return a > 0


def to_model_pixels(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [3, size, size]: the model's input before normalisation.

    The whole frame is resized (no centre crop): a defect at the image border must stay visible. Decode tasks
    hand this to the scoring actors (a quarter of float32's bytes through the object store and to the GPU);
    `normalize` finishes it there, on the actor's device.
    """
    img = Image.fromarray(rgb).resize((size, size), Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # [3, S, S]


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., 3, S, S] -> CLIP-normalised float32 (x / 255 - mean) / std, per channel."""
    x = np.asarray(pixels, dtype=np.float32) / 255.0
    return (x - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]


def to_model_input(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> CLIP-normalised float32 [3, size, size] (to_model_pixels, then normalize)."""
    return np.ascontiguousarray(normalize(to_model_pixels(rgb, size)))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """bool [H, W] -> bool [size, size], nearest neighbour (keeps the mask exact, no new labels)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    return np.asarray(img) > 127


HEATMAP_RANGE = 4.0  # a product's heatmaps span [0, 4 x its threshold]: the threshold sits at 16384 of 65535
HEATMAP_DECODE = "anomaly = v / 65535 * scale, then bilinear resize to (height, width)"


def heatmap_scale(threshold: float, amap: np.ndarray) -> float:
    """The fixed scale of a product's heatmaps: HEATMAP_RANGE x its threshold, the same for every image of the
    product and model version, so two heatmaps compare by eye and by value (anomaly above it saturates).
    Only a threshold that is not a positive number (never from a fitted model) falls back to the map's maximum."""
    if np.isfinite(threshold) and threshold > 0:
        return float(HEATMAP_RANGE * threshold)
    top = float(np.max(amap)) if np.size(amap) else 0.0
    return top if top > 0 else 1.0


def heatmap_size(height: int, width: int, side: int | None) -> tuple[int, int]:
    """The stored size of an image's heatmap: its own (height, width) when side is None, else the aspect kept
    with the long side at most `side` (a map carries no more than its patch grid, upsampled and blurred)."""
    if side is None or max(height, width) <= side:
        return height, width
    f = side / max(height, width)
    return max(1, round(height * f)), max(1, round(width * f))


def encode_heatmap(amap: np.ndarray, height: int, width: int, scale: float, side: int | None = None) -> bytes:
    """float [h, w] anomaly map -> 16-bit grayscale PNG of the image (height x width), stored at
    heatmap_size(height, width, side).

    Decode (HEATMAP_DECODE, also in the PNG's text chunks with the scale and the source size): pixel value v
    means anomaly v / 65535 * scale; resizing the stored map bilinearly to (height, width) gives the map at
    the image's resolution. Values at or above `scale` are stored as 65535.
    """
    h, w = heatmap_size(height, width, side)
    a = np.asarray(amap, dtype=np.float32)
    if (h, w) != a.shape:
        a = np.asarray(Image.fromarray(a, mode="F").resize((w, h), Image.BILINEAR))
    q = np.round(np.clip(a / scale, 0.0, 1.0) * 65535.0).astype(np.uint16)
    return png16(q, {"scale": repr(float(scale)), "height": str(height), "width": str(width), "decode": HEATMAP_DECODE})


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(q: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """uint16 [h, w] -> a 16-bit grayscale PNG (PNG spec: IHDR bit depth 16, colour type 0) with `text` as
    tEXt chunks `anople:<key>`. Written here rather than by PIL, whose encoder tries five filters on every
    row: 7-11 ms for a 224 px map, 4-5x this one (every row "Up"-filtered, which suits smooth maps, and
    zlib level 1, as small as level 6 on them). Any PNG reader decodes it (tests: PIL, Chromium)."""
    h, w = q.shape
    raw = np.ascontiguousarray(q, dtype=">u2").view(np.uint8).reshape(h, 2 * w)  # big-endian samples
    lines = np.empty((h, 1 + 2 * w), dtype=np.uint8)
    lines[:, 0] = 2  # filter type Up: each byte minus the byte above it (mod 256); the first row minus zeros
    lines[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=lines[1:, 1:])
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))]
    chunks += [_chunk(b"tEXt", f"anople:{k}".encode("latin-1") + b"\0" + v.encode("latin-1"))
               for k, v in (text or {}).items()]
    chunks += [_chunk(b"IDAT", zlib.compress(lines.tobytes(), 1)), _chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def decode_heatmap(data: bytes, scale: float | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Inverse of encode_heatmap: PNG bytes -> float32 anomaly map [H, W]. The scale defaults to the one in the
    PNG; `size` (height, width), e.g. the score row's source size, resizes bilinearly as HEATMAP_DECODE says."""
    with Image.open(io.BytesIO(data)) as img:
        if scale is None:
            scale = float(img.text["anople:scale"])
        q = np.asarray(img, dtype=np.float32)
    a = q / 65535.0 * scale
    if size is not None and tuple(size) != a.shape:
        a = np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((size[1], size[0]), Image.BILINEAR))
    return a.astype(np.float32)
