"""JPEG decode on the scoring actor's device: nvJPEG on a GPU (torchvision.io.decode_jpeg, batched), libjpeg on
a CPU. The GPU path exists because an H100 node's CPUs cannot feed it: PIL decodes a 1024 px JPEG at 43
images/s a core (163 with its DCT-domain draft), nvJPEG batch 256 at 5,842 images/s (../shared/DESIGN.md,
measured). Which rows come here is the decode task's call (images.device_jpeg: complete baseline RGB or
grayscale JPEGs of bounded size); anything this path cannot decode is decoded by PIL, in this process, as the
CPU tasks would; only bytes neither can decode become error rows.

The output is the model's uint8 input, as decoding.decode_batch makes it on the CPU: the whole frame in display
orientation (EXIF applied here: nvJPEG ignores it), resized to S x S with antialiased bicubic (PIL's filter).
Not bit-identical to the CPU path, which first decodes at a reduced scale in the DCT domain (Image.draft) and
then resizes: within a few grey levels (tests.test_device_decode).
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.sources.decoding import error_text
from pipeline.sources.images import decode_scaled, to_model_pixels

log = logging.getLogger(__name__)

# decoded RGB bytes held on the device at once, per decode_jpeg call: a batch of full-size images is
# decoded in chunks no larger than this (a 1024 px image is 3 MB; DEVICE_DECODE_MAX_PIXELS is 75 MB)
CHUNK_BYTES = 1 << 30
# images resized in one call: their float32 copy is 4x their bytes (32 images of 1024 px: 400 MB)
RESIZE_GROUP = 32


def _decode_jpeg(tensors: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs for TorchCodec (not a dependency here); they work as before
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """[C, H, W] as stored -> display orientation, as PIL's ImageOps.exif_transpose (EXIF tag 0x0112)."""
    hw = (-2, -1)
    return {1: lambda t: t, 2: lambda t: t.flip(-1), 3: lambda t: t.flip(hw), 4: lambda t: t.flip(-2),
            5: lambda t: t.transpose(-2, -1), 6: lambda t: t.rot90(-1, hw),  # 6: rotate 90 clockwise
            7: lambda t: t.transpose(-2, -1).flip(hw), 8: lambda t: t.rot90(1, hw)}[int(orientation)](img)


def resize_pixels(imgs: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, size, size], antialiased bicubic (torch's antialias follows PIL's
    filter, as images.to_model_pixels resizes): the whole frame, no crop."""
    x = F.interpolate(imgs.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


class DeviceDecoder:
    """JPEG bytes -> the model's uint8 input [N, 3, S, S] on `device`; counts what fell back to PIL. When the
    device decodes none of a chunk's images one by one (no nvJPEG in this torchvision build, a broken driver),
    it is given up for good, said once, and PIL decodes everything: slower, nothing lost."""

    WARN_FIRST = 5  # per-image device failures logged one by one; the rest only counted

    def __init__(self, size: int, device: str):
        self.size, self.device = size, device
        self.fallbacks = 0
        self.device_failures = 0  # images the device rejected one by one
        self.unusable: str | None = None  # why the device decode was given up, once it is

    def __call__(self, jpegs: list[bytes], orientations: list[int], sizes: list[tuple[int, int]]
                 ) -> tuple[torch.Tensor, list[str | None]]:
        """-> (pixels [N, 3, S, S] uint8 on the device, per row None or why it could not be decoded at all).
        `sizes` are the images' (H, W) in display orientation (from the header), to bound each chunk."""
        n, S = len(jpegs), self.size
        out = torch.zeros(n, 3, S, S, dtype=torch.uint8, device=self.device)
        errors: list[str | None] = [None] * n
        for chunk in self._chunks(sizes):
            decoded = self._decode(jpegs, chunk)
            # display orientation first, then one resize per distinct source size (a night is mostly one size)
            shown = {i: orient(decoded[i], orientations[i]) for i in chunk if decoded.get(i) is not None}
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, img in shown.items():
                by_shape.setdefault(tuple(img.shape), []).append(i)
            for rows in by_shape.values():
                for k in range(0, len(rows), RESIZE_GROUP):
                    part = rows[k:k + RESIZE_GROUP]
                    out[part] = resize_pixels(torch.stack([shown[i] for i in part]), S)
            for i in chunk:
                if decoded.get(i) is None:  # the device could not: PIL, as the CPU decode tasks do
                    self.fallbacks += 1
                    try:
                        rgb, _ = decode_scaled(jpegs[i], S)
                        out[i] = torch.from_numpy(to_model_pixels(rgb, S)).to(self.device)
                    except Exception as e:  # the row becomes an error row, worded as the CPU tasks word it
                        errors[i] = error_text(e)
        return out, errors

    def _chunks(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        chunks, cur, held = [], [], 0
        for i, (h, w) in enumerate(sizes):
            if cur and held + 3 * h * w > CHUNK_BYTES:
                chunks.append(cur)
                cur, held = [], 0
            cur.append(i)
            held += 3 * int(h) * int(w)
        return chunks + ([cur] if cur else [])

    def _decode(self, jpegs: list[bytes], rows: list[int]) -> dict[int, torch.Tensor | None]:
        """One batched decode of `rows`; when it fails as a whole, each row alone, so one bad image costs only
        itself (decode_jpeg returns no partial results). A row the device rejects maps to None."""
        if self.unusable is not None:
            return {i: None for i in rows}
        tensors = [torch.frombuffer(bytearray(jpegs[i]), dtype=torch.uint8) for i in rows]
        try:
            return dict(zip(rows, _decode_jpeg(tensors, self.device)))
        except Exception as e:
            log.warning("batched device decode of %d JPEGs failed (%s: %s); decoding them one by one", len(rows),
                        type(e).__name__, e)
        out: dict[int, torch.Tensor | None] = {}
        last = None
        for i, t in zip(rows, tensors):
            try:
                out[i] = _decode_jpeg([t], self.device)[0]
            except Exception as e:
                last, out[i] = f"{type(e).__name__}: {e}", None
                self.device_failures += 1
                if self.device_failures <= self.WARN_FIRST:
                    log.warning("device decode failed (%s); decoding with PIL", last)
        if len(rows) > 1 and all(v is None for v in out.values()):
            self.unusable = last
            log.error("device decode gave up on %s after every image of a chunk failed (%s); this actor decodes "
                      "its JPEGs with PIL from now on", self.device, last)
        return out


def raw_pixels(raw: list[bytes], size: int) -> np.ndarray:
    """decode_batch's `raw` column (uint8 [3, S, S] bytes of rows the CPU decoded) -> [N, 3, S, S]."""
    return np.stack([np.frombuffer(r, dtype=np.uint8).reshape(3, size, size) for r in raw])
