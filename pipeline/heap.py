"""glibc heap policy for the processes that run the model (ctypes only: no torch, safe to import anywhere).

Two levers, both measured on the scoring path (2-core CPU node, ViT-S-16, batch 32):
- `keep_large_blocks_on_heap`: glibc serves every block above its mmap threshold (dynamic, at most 32 MB)
  with a fresh mmap and unmaps it on free, so each forward page-faults its large activations in again (a
  [32, 197, 1536] float32 MLP hidden is 38 MB: always above). The scoring actor took ~8,500 minor faults an
  image and spent ~12% of its CPU in the kernel; with large blocks kept on the heap, ~20 faults an image and
  `Scorer.score` ran 12.4-14.5 images/s against 9.0-11.1 (same process kind, one thread pool as in Ray Data).
- `release_freed_memory`: what is free at the end of a stretch of batches goes back to the OS (malloc_trim,
  which also returns free pages in the middle of the heap), so resident memory stays at one batch's worth
  however long the night is. Callers trim every few batches, not after each: trimming after every batch would
  bring the page faults back.
Not glibc (macOS, musl): both are no-ops. `ANOPLE_HEAP_POLICY=default` (in the environment the job's
processes start with) leaves glibc's own policy in place: an operator's way out, and the benchmark's A/B.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # mallopt parameters (malloc.h)
KEEP_FREE_BYTES = 1 << 30               # free memory at the heap top kept for the next batch, between trims


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: nothing to tune or trim
        return None


_LIBC = _glibc()
_kept = False


def keep_large_blocks_on_heap() -> bool:
    """Process-wide: large blocks come from the heap (M_MMAP_MAX = 0) and up to KEEP_FREE_BYTES freed at its top
    stay mapped (M_TRIM_THRESHOLD), so batch after batch reuses the same pages. Call once, before the model's
    first forward, in a process that then calls `release_freed_memory` now and then. True when applied (False
    off glibc, or when ANOPLE_HEAP_POLICY=default)."""
    global _kept
    if _LIBC is not None and not _kept and os.environ.get("ANOPLE_HEAP_POLICY", "") != "default":
        _kept = bool(_LIBC.mallopt(M_MMAP_MAX, 0)) and bool(_LIBC.mallopt(M_TRIM_THRESHOLD, KEEP_FREE_BYTES))
    return _kept


def release_freed_memory() -> None:
    """Hand the heap pages glibc keeps after free() back to the OS (malloc_trim). Long-lived scoring actors
    and decode workers allocate and free batch-sized buffers all night; without this their resident memory
    creeps up with the night's length instead of staying at one batch's worth."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
