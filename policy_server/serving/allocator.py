"""glibc malloc settings for a worker: keep large per-forward temporaries instead of
returning them to the kernel after every forward; and give the heap's free memory back once
a model version is unloaded (:func:`trim_heap`).

By default glibc serves blocks over its (dynamic) mmap threshold with fresh ``mmap`` calls
and gives them back with ``munmap``, so each forward's few MB of temporaries are
page-faulted afresh. Raising the mmap threshold and the trim threshold keeps them in the
heap. Off by default: measured in docs/front-door.md ("Measurements"), it changed neither page
faults nor CPU per request here (glibc's dynamic mmap threshold already rises after the
first large free). ``--malloc-tuning`` turns it on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024  # glibc caps it at 32 MiB on 64-bit
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def trim_heap() -> bool:
    """Return the heap's free memory to the kernel (glibc ``malloc_trim(0)``; False elsewhere).

    An unloaded version's tensors are freed by reference counting, but glibc keeps freed
    blocks under its (dynamic, up to 32 MiB) mmap threshold in the heap: without a trim a
    worker's RSS stays at two versions' worth after the second one is gone. The call
    releases the GIL (ctypes) and takes milliseconds."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))


def tune_malloc() -> bool:
    """Set the thresholds with ``mallopt`` (glibc only); False where it is not available."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not ok:
        log.warning("mallopt refused the thresholds; glibc defaults stay")
    return ok
