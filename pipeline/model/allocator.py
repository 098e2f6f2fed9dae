"""Keep a batch's freed activations in the heap for the next batch (glibc's malloc).

glibc serves every block at or above its mmap threshold with a fresh ``mmap`` and gives it back
to the kernel on ``free``; the threshold adapts, but never past 32 MiB on 64-bit (mallopt(3)),
and freed memory at the top of the heap beyond the trim threshold goes back too. A batch of 16
through EfficientNet-Lite0 allocates activations of up to 77 MB (16 x 96 x 112 x 112 floats), so
each batch faulted in and zeroed hundreds of MB of new pages: 40 % of a Spark worker's CPU was in
the kernel (2.7 M minor faults per 320 images). With both thresholds at 512 MiB the freed memory
stays in the heap for the next batch. ``bench/classify_bench.py``, one thread, real photos:
43.6 -> 26.2 CPU-ms per image, no page faults, for a peak 110 MB higher (1.07 -> 1.18 GB) that
stays resident between batches (0.90 GB before). 256 MiB was not enough: a batch's freed top
sometimes passed it and was trimmed. ``BUCKETLENS_MALLOC_KEEP_MB=0`` keeps glibc's defaults;
other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_first: tuple[int, bool] | None = None  # the first call's value, and whether glibc took it


def keep_freed_memory(mb: int) -> bool:
    """Raise this process's mmap and trim thresholds to ``mb`` MiB; whether they were set.

    False when ``mb`` is 0, when the C library is not glibc, or when glibc refuses the value.
    Once per process: the first call's value stands (the thresholds are process-wide).
    """
    global _first
    with _lock:
        if _first is None:
            _first = (mb, _set_thresholds(mb))
        first_mb, kept = _first
        return kept and first_mb == mb


def _set_thresholds(mb: int) -> bool:
    if mb <= 0 or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    size = mb * 1024 * 1024
    return bool(libc.mallopt(M_MMAP_THRESHOLD, size)) and bool(libc.mallopt(M_TRIM_THRESHOLD, size))
