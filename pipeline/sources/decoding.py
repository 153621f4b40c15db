"""The decode task of a scoring run: archive rows (image bytes) -> the model's uint8 input, in Ray Data's CPU
tasks. Kept free of torch, open_clip, faiss and MLflow (numpy and PIL only): the worker processes that run
it (with Ray Data's Parquet read, fused into the same task) import none of them, where pickling the task
from pipeline.nightly.stages made every decode worker load them all (~1 GB resident each, measured).
"""
from __future__ import annotations

import numpy as np

from pipeline.heap import release_freed_memory
from pipeline.sources.images import (ImageDecodeError, decode_mask, decode_scaled, device_jpeg, resize_mask,
                                     to_model_pixels)

# Where a night's JPEGs are decoded (jobs.score --decode): in Ray's CPU tasks (PIL, reduced-size decode), or on
# the scoring actors' device (decode_batch's `on_device`; device_decode). "auto" (the default) resolves per run
# (decode_where): on the actors where they hold GPUs, in the CPU tasks where they run on CPUs.
DECODE_CHOICES = ("auto", "cpu", "device")


def decode_where(decode: str, on_gpu: bool) -> str:
    """--decode resolved for a run whose scoring actors hold GPUs (`on_gpu`) or not: "cpu" or "device".

    Why auto means device on GPUs: per 1024 px JPEG the CPU tasks' decode costs a core 6.4 ms, the header check
    that replaces it 0.04 ms, and the actor's nvJPEG decode + resize adds 0.11 ms to its GPU loop (H200 node,
    16 vCPUs: infra/benchmarks/2026-12-04-h200-gpu-bench.md). With the heatmap writer's 2.5 ms, CPU decode needs
    ~9 ms of a core per image against the actor's 0.6-0.7 ms, so a node needs more than ~14 free cores per GPU
    before the tasks keep up, and nodes are built with 8-24 vCPUs per GPU. On a CPU actor the opposite holds:
    its full-size decode is slower than the tasks' reduced one, on the cores the forward needs."""
    if decode not in DECODE_CHOICES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_CHOICES)}, not {decode!r}")
    if decode == "auto":
        return "device" if on_gpu else "cpu"
    return decode


def error_text(e: Exception) -> str:
    """A row's error for an image that did not decode: ImageDecodeError's own words, anything else with its type."""
    return str(e) if isinstance(e, ImageDecodeError) else f"{type(e).__name__}: {e}"


def labels(values) -> np.ndarray:
    """Archive labels (0/1, null -> None or NaN in numpy) -> int8 with -1 for unknown."""
    return np.array([-1 if v is None or (isinstance(v, float) and np.isnan(v)) else int(v) for v in values],
                    dtype=np.int8)


def decode_batch(batch: dict, image_size: int, with_masks: bool, duplicates: frozenset = frozenset(),
                 on_device: bool = False) -> dict:
    """CPU task: image bytes -> model input as uint8 (normalised on the actor's device: a quarter of the bytes
    through the object store). Failures become status/error, never exceptions. A row without
    an image_id, or with one that other rows of the night carry too (`duplicates`), is an error row: its
    score and heatmap could not be told apart from theirs.

    With `on_device` the JPEGs the scoring actor can decode itself (images.device_jpeg) are passed on as
    their bytes, checked from the header only: columns `jpeg` (the bytes), `orientation` (EXIF) and `raw`
    (uint8 [3, S, S] bytes of the rows decoded here) replace `pixels`; each ok row fills one of the two."""
    n = len(batch["image_id"])
    pixels = np.zeros((n, 3, image_size, image_size), dtype=np.uint8)
    jpeg, orientation = [b""] * n, np.zeros(n, dtype=np.int8)
    hw = np.zeros((n, 2), dtype=np.int32)
    status, error = ["ok"] * n, [""] * n
    masks = np.zeros((n, image_size, image_size), dtype=bool) if with_masks else None
    for i in range(n):
        image_id = batch["image_id"][i]
        if image_id is None or image_id == "":
            status[i], error[i] = "error", "row has no image_id"
            continue
        if image_id in duplicates:
            status[i], error[i] = "error", ("duplicate image_id: other rows of this night carry it too; "
                                            "none of them is scored (fix the archive)")
            continue
        try:
            on_actor = device_jpeg(batch["image"][i]) if on_device else None
            if on_actor is not None:
                (orientation[i], size), jpeg[i] = on_actor, batch["image"][i]
            else:
                rgb, size = decode_scaled(batch["image"][i], image_size)  # full size, display orientation
                pixels[i] = to_model_pixels(rgb, image_size)
            hw[i] = size
            if with_masks:
                m = batch["mask"][i]
                full = decode_mask(m if m is not None else None, size)
                if full.shape != size:
                    raise ImageDecodeError(f"mask shape {full.shape} differs from image {size}")
                masks[i] = resize_mask(full, image_size)
        except Exception as e:  # decode_image already words its own errors; anything else is reported as is
            status[i], error[i] = "error", error_text(e)
    if on_device:
        ok = [status[i] == "ok" and not jpeg[i] for i in range(n)]
        images = {"jpeg": np.array(jpeg, dtype=object), "orientation": orientation,
                  "raw": np.array([pixels[i].tobytes() if ok[i] else b"" for i in range(n)], dtype=object)}
    else:
        images = {"pixels": pixels}
    out = {"image_id": batch["image_id"], "product": batch["product"], **images,
           "source_uri": batch["source_uri"] if "source_uri" in batch else np.full(n, None, dtype=object),
           "height": hw[:, 0], "width": hw[:, 1], "status": np.array(status), "error": np.array(error)}
    if with_masks:
        out.update(mask=masks, label=labels(batch["label"]))
    release_freed_memory()  # the decoded full-size images are garbage now
    return out
